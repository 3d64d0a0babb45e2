"""The ``rlox`` command line: prepare preference data, train with DPO, evaluate, plot, demo.

Every sub-command reports a failure as one line on stderr: exit status 2 for a mistake in the
command line or the config file (unknown option or key, bad value, missing input), 1 for an error
while running. ``--debug`` shows the full traceback instead.

The options live elsewhere: :mod:`rlox.cli_config` holds :class:`TrainConfig` (the ``rlox
train`` options, its TOML file and checks), :mod:`rlox.cli_parser` the flags of every command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlox.cli_config import (
    LORA_FLAGS,
    TrainConfig,
    UsageError,
    check_data,
    check_model_dir,
    load_train_config,
)
from rlox.cli_parser import PROG, build_parser, unrecognized
from rlox.tracking import RECORD_METRICS

__all__ = ["TrainConfig", "UsageError", "build_parser", "load_train_config", "main", "train"]


# ------------------------------------------------------------------------------ shared bits
@contextlib.contextmanager
def _quiet_transformers(debug: bool) -> Iterator[None]:
    """Hide transformers' load/save progress bars and info logs (kept with --debug)."""
    if debug or not _has_module("transformers"):
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_line_warnings(prog: str, *, enabled: bool = True) -> Iterator[None]:
    """Show Python warnings as ``PROG: warning: message`` lines; hide deprecation notices."""
    if not enabled:
        yield
        return
    original = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, *_: Any, **__: Any) -> None:
        if issubclass(category, DeprecationWarning | FutureWarning):
            return  # about the libraries' own APIs, nothing a run can act on (shown with --debug)
        text = " ".join(str(message).split())
        print(f"{prog}: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def load_tokenizer(path: str | os.PathLike[str], option: str = "tokenizer") -> Any:
    """A tokenizer from a directory (transformers, local files only) or a tokenizer.json file."""
    p = Path(path).expanduser()
    if p.is_file():
        import tokenizers

        try:
            return tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the tokenizers library raises plain Exception
            raise UsageError(
                f"{option}: {p} is not a tokenizer.json file ({_first_line(e)})"
            ) from None
    if not p.is_dir():
        raise UsageError(f"{option}: {p} not found")
    if _has_module("transformers"):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{option}: {p} holds no usable tokenizer ({_first_line(e)})"
            ) from None
    if (p / "tokenizer.json").is_file():
        return load_tokenizer(p / "tokenizer.json", option)
    raise UsageError(f"{option}: {p} holds no tokenizer.json (install transformers for others)")


def _load_dataset(
    path: str, tokenizer: Any, option: str, *, progress: bool
) -> Any:  # -> PreferenceDataset
    from rlox.data import PreferenceDataset

    p = Path(path).expanduser()
    if p.is_dir():
        return PreferenceDataset.load(p)
    if tokenizer is None:
        raise UsageError(
            f"{option}: {p} is text and needs a tokenizer (the model directory has none; "
            "pass --tokenizer)"
        )
    return PreferenceDataset.from_text(p, tokenizer, show_progress=progress)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pad_id(tokenizer: Any) -> int | None:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------- sub-commands
def cmd_prepare(args: argparse.Namespace) -> int:
    from rlox.data import PreferenceDataset
    from rlox.ingest import expand_inputs

    try:
        inputs = expand_inputs(args.data)
    except ValueError as e:
        raise UsageError(f"--data: {str(e).split(': ', 1)[-1]}") from None
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    if args.max_prompt_length is not None and args.max_length is not None:
        if args.max_prompt_length >= args.max_length:
            raise UsageError(f"--max-prompt-length: must be below --max-length ({args.max_length})")
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    start = time.perf_counter()
    ds = PreferenceDataset.from_text(
        inputs,
        tokenizer,
        out=out,
        shard=args.shard,
        resume=args.resume,
        part_tokens=args.part_tokens,
        add_eos=not args.no_eos,
        batch_size=args.tokenize_batch_size,
        show_progress=not args.no_progress,
    )
    if len(ds) == 0 and args.shard is None:
        raise ValueError(f"--data: {args.data} holds no preference pairs")
    seconds = time.perf_counter() - start
    summary = dataset_summary(
        ds,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    summary |= {"source": str(args.data), "store": str(ds.directory), "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def dataset_summary(
    ds: Any,
    *,
    batch_size: int = 64,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """Pairs, tokens, lengths, truncation at ``max_length`` and the padding of each layout."""
    import numpy as np

    stats = ds.stats(batch_size, max_length=max_length, max_prompt_length=max_prompt_length)
    lens = ds.lengths()
    prompt = lens.prompt
    if max_prompt_length is not None:
        kept_prompt = np.minimum(prompt, max_prompt_length)
        prompt_cut = prompt > max_prompt_length
    else:
        kept_prompt, prompt_cut = prompt, np.zeros_like(prompt, dtype=bool)
    if max_length is None:
        chosen_cut = rejected_cut = dropped = np.zeros_like(prompt, dtype=bool)
    else:
        chosen_cut = kept_prompt + lens.chosen > max_length
        rejected_cut = kept_prompt + lens.rejected > max_length
        dropped = kept_prompt >= max_length
    truncated = prompt_cut | chosen_cut | rejected_cut
    n = len(ds)
    return {
        "pairs": n,
        "tokens": stats["tokens"] | {"total": sum(stats["tokens"].values())},
        "lengths": stats["lengths"],
        "truncation": {
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "pairs_truncated": int(truncated.sum()),
            "prompts_truncated": int(prompt_cut.sum()),
            "chosen_truncated": int(chosen_cut.sum()),
            "rejected_truncated": int(rejected_cut.sum()),
            "pairs_dropped": int(dropped.sum()),
        },
        "padding": {"batch_size": batch_size}
        | {layout: info["fraction"] for layout, info in stats["padding"].items()},
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`dataset_summary`."""
    n = summary["pairs"]
    tokens = summary["tokens"]
    trunc = summary["truncation"]

    def share(k: int) -> str:
        return f"{k:,} ({k / n:.1%})" if n else str(k)

    lines = []
    if "store" in summary:
        lines.append(
            f"Saved {n:,} pairs from {summary['source']} to {summary['store']} "
            f"({summary['seconds']:.1f} s)"
        )
    else:
        lines.append(f"{n:,} pairs")
    lines.append("")
    lines.append(f"{'column':<10}{'tokens':>12}{'mean':>9}{'p50':>8}{'p95':>8}{'max':>8}")
    for column in ("prompt", "chosen", "rejected"):
        info = summary["lengths"].get(column)
        row = f"{column:<10}{tokens[column]:>12,}"
        if info is not None:
            row += f"{info['mean']:>9.1f}"
            row += "".join(f"{info.get(p, math.nan):>8.0f}" for p in ("p50", "p95", "p100"))
        lines.append(row)
    lines.append(f"{'total':<10}{tokens['total']:>12,}")
    lines.append("")
    limit = f"max_length={trunc['max_length']}"
    if trunc["max_prompt_length"] is not None:
        limit += f", max_prompt_length={trunc['max_prompt_length']}"
    lines.append(
        f"truncation at {limit}: {share(trunc['pairs_truncated'])} pairs truncated "
        f"(prompts {trunc['prompts_truncated']:,}, chosen {trunc['chosen_truncated']:,}, "
        f"rejected {trunc['rejected_truncated']:,}); {share(trunc['pairs_dropped'])} dropped "
        "because the prompt fills max_length"
    )
    padding = summary["padding"]
    layouts = [k for k in padding if k != "batch_size"]
    lines.append(
        f"padding at batch_size={padding['batch_size']}: "
        + ", ".join(f"{k} {padding[k]:.1%}" for k in layouts)
    )
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {
        name: getattr(args, name)
        for name in (*TrainConfig.option_names(), *LORA_FLAGS)
        if hasattr(args, name)
    }
    config = load_train_config(args.config, overrides)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    train(config, debug=args.debug)
    return 0


def train(config: TrainConfig, *, debug: bool = False) -> Path:
    """Run ``rlox train`` for a validated config; returns the directory of the final policy."""
    import torch

    from rlox import DPO
    from rlox.hf import frozen_copy, is_peft_model, load_pretrained, save_pretrained
    from rlox.trackers import report_to_names, require_trackers
    from rlox.train.positions import resolve_max_length

    require_trackers(report_to_names(config.report_to))  # before the model loads
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = _resolve_device(config.device)
    with _quiet_transformers(debug):
        model, tokenizer = load_pretrained(
            config.model, dtype=config.dtype, device=device, lora=config.lora
        )
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    try:
        resolve_max_length(model, config.max_length)
    except ValueError as err:
        raise UsageError(str(err)) from None
    progress = config.progress
    train_ds = _load_dataset(config.data, tokenizer, "data", progress=progress)
    if config.eval_data is not None:
        eval_ds = _load_dataset(config.eval_data, tokenizer, "eval_data", progress=progress)
    elif config.eval_fraction > 0:
        train_ds, eval_ds = train_ds.train_test_split(config.eval_fraction, seed=config.seed)
    else:
        eval_ds = None
    out = Path(config.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.toml").write_text(config.to_toml())
    peft = is_peft_model(model)
    dpo_kwargs = config.dpo_kwargs(_pad_id(tokenizer))
    fit_kwargs = config.fit_kwargs()
    needs_reference = not (config.reference_free or _reference_free_loss(config))
    # With LoRA the reference is the model itself with the adapters disabled.
    ref = frozen_copy(model) if needs_reference and not peft else None
    trainer = DPO(model, ref, **dpo_kwargs)
    if config.precompute_reference and needs_reference:
        keys = ("batch_size", "max_tokens", "layout", "max_length", "max_prompt_length")
        extra = ("truncation", "pack_length", "pad_to_multiple_of", "mixed_precision")
        data_kwargs = {k: fit_kwargs[k] for k in (*keys, *extra)}
        with trainer._reference_weights.hashed_once():  # the reference weights are hashed once
            for ds in (train_ds, eval_ds):
                # A store that already holds matching log-probs (a resumed run) is not scored again.
                if ds is not None and trainer._reference_source(ds, data_kwargs) is None:
                    trainer.precompute_reference(ds, progress=progress, **data_kwargs)
        if not peft:
            # The cached log-probs replace the frozen copy, which is freed.
            del trainer, ref
            trainer = DPO(model, None, precomputed_reference=True, **dpo_kwargs)
    result = trainer.fit(train_ds, eval_ds, **fit_kwargs)
    final = out / "final"
    with _quiet_transformers(debug):
        save_pretrained(model, final, tokenizer, merge_lora=peft and config.merge_lora)
    summary = f"{result.steps} steps ({result.skipped} skipped) in {result.seconds:.1f} s"
    if result.eval:
        summary += (
            f"; eval loss {result.eval['loss']:.4f}, reward accuracy "
            f"{result.eval['reward_accuracy']:.3f}"
        )
    print(summary)
    print(f"saved the trained policy to {final}")
    return final


def _reference_free_loss(config: TrainConfig) -> bool:
    from rlox.losses import check_loss_options

    return not check_loss_options(**config.loss_options())["needs_reference"]


EVAL_KEYS = RECORD_METRICS


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rlox import DPO
    from rlox.hf import is_peft_model, load_pretrained
    from rlox.train.positions import resolve_max_length

    if args.precomputed_reference and args.ref_model is not None:
        raise UsageError("--precomputed-reference: give it or --ref-model, not both")
    check_model_dir(args.model, "--model")
    if args.ref_model is not None:
        check_model_dir(args.ref_model, "--ref-model")
    check_data(args.data, "--data")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    with _quiet_transformers(args.debug):
        model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=device)
        ref = None
        if args.ref_model is not None:
            ref, _ = load_pretrained(args.ref_model, dtype=args.dtype, device=device)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    try:
        resolve_max_length(model, args.max_length)
    except ValueError as err:
        raise UsageError(f"--{err}".replace("max_length", "max-length", 1)) from None
    reference_free = ref is None and not is_peft_model(model) and not args.precomputed_reference
    if reference_free:
        print(
            f"{PROG} eval: note: no --ref-model; rewards are measured against a zero reference",
            file=sys.stderr,
        )
    ds = _load_dataset(args.data, tokenizer, "--data", progress=False)
    trainer = DPO(
        model,
        ref,
        beta=args.beta,
        loss_type=args.loss_type,
        reference_free=reference_free,
        pad_token_id=_pad_id(tokenizer),
        precomputed_reference=args.precomputed_reference,
    )
    metrics = trainer.evaluate(
        ds,
        batch_size=args.batch_size if args.max_tokens is None else None,
        max_tokens=args.max_tokens,
        layout=args.layout,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        truncation=args.truncation,
        mixed_precision=args.mixed_precision,
    )
    report: dict[str, Any] = {
        "pairs": int(metrics.get("num_pairs", len(ds))),
        "dropped": int(metrics.get("num_dropped", 0)),
    }
    report |= {k: float(metrics[k]) for k in EVAL_KEYS if k in metrics}
    report |= {k: float(v) for k, v in metrics.items() if k.startswith("loss_")}
    if args.json:
        print(json.dumps(_json_safe(report), indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            text = f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
            print(f"{key:<{width}}  {text}")
    return 0


def _json_safe(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()
    }


def cmd_plot(args: argparse.Namespace) -> int:
    from rlox.plot import plot_run

    run = Path(args.run_dir).expanduser()
    if not run.exists():
        raise UsageError(f"RUN_DIR: {run} not found")
    try:
        paths = plot_run(run, args.out)
    except ImportError as e:
        raise RuntimeError(str(e)) from None
    if not paths:
        print(f"no metrics to plot in {run}")
    for path in paths:
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rlox.demo import run_from_args

    return run_from_args(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rlox`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = PROG
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise unrecognized(parser, args.command, extra)
        args.debug = getattr(args, "debug", False)
        prog = f"{PROG} {args.command}"
        with _one_line_warnings(prog, enabled=not args.debug):
            return int(COMMANDS[args.command](args) or 0)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # the reader of stdout went away (e.g. `rlox ... | head`)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UsageError as e:
        if debug:
            raise
        print(f"{e.prog or prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        text = _first_line(e)
        if not isinstance(e, ValueError | TypeError | OSError | ImportError | RuntimeError):
            text = f"{type(e).__name__}: {text}"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
