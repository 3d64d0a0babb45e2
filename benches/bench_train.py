"""DPO training throughput: rlox against Hugging Face TRL 1.16's ``DPOTrainer``.

Usage: python benches/bench_train.py [--profile both] [--vocab 32000] [--hidden 256] [--layers 4]
           [--steps 12] [--warmup 2] [--repeats 2] [--max-length 512] [--device cpu]
           [--dtype float32] [--threads 1] [--attention auto] [--logits-chunk-size 0]
           [--gradient-checkpointing] [--compile] [--layouts-only]

Both contenders train the same Llama (built from a config, float32 weights, sdpa attention,
same seed) on the same synthetic pairs (benches/_common.py: lognormal lengths, sigma 0.7, cap
2048; ``ultrafeedback``: prompt median 70, responses 170; ``hh``: prompt 100, responses 45) with
the same hyper-parameters: 8 pairs per step, ``--max-length``, AdamW at a constant lr, clip 1.0,
beta 0.1, dropout off, a live reference model. One epoch of ``--steps`` steps; the first
``--warmup`` steps are not timed. Each contender runs in its own process, interleaved
(A B C, A B C, ...) ``--repeats`` times; the table shows medians.

Rows:
- ``TRL like-for-like``: ``bf16`` = (``--dtype bf16``), gradient checkpointing as given to rlox
  (off unless ``--gradient-checkpointing``);
- ``TRL defaults``: ``bf16=True``, gradient checkpointing on, TRL's default optimizer
  (``adamw_torch_fused`` with torch >= 2.8): TRL's own defaults; on CPU this is
  bf16 autocast on the CPU (slow where the CPU lacks bf16 arithmetic; ``--no-trl-defaults`` skips
  it);
- ``rlox <layout>``: ``DPO.fit`` with ``padded``, ``packed`` and ``prefix_shared`` batches.

``--attention``, ``--logits-chunk-size`` (``auto`` = None), ``--[no-]gradient-checkpointing`` and
``--[no-]compile`` are passed to ``rlox.DPO`` (or ``DPO.fit``) only when given; a row whose
option this rlox does not take shows ``n/a``. ``--dtype bf16`` is autocast in both contenders
(``mixed_precision="bf16"`` / ``bf16=True``), weights stay float32.

Columns: tokens/s (real tokens of the timed steps: per pair min(P+C, L) + min(P+R, L), the same
count for every contender), steps/s, peak RSS of the process (and RSS when training started),
peak CUDA memory on CUDA, and the ratios to TRL like-for-like (tokens/s, steps/s, peak
memory: CUDA on CUDA, RSS on CPU).

``--layouts-only``: rlox ``fit`` steps/s per layout relative to ``padded``, by default on HH-like
pairs with a Llama of hidden 512 x 8 layers, vocab 8k (where the decoder, not the LM head,
dominates).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RLOX_OPTIONS, Setup, param_count, run_contender, supported_options  # noqa: E402

LAYOUTS = ("padded", "packed", "prefix_shared")
UNSET = object()


def chunk_size(text: str) -> int | None:
    return None if text == "auto" else int(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("ultrafeedback", "hh", "both"), default=None)
    ap.add_argument(
        "--vocab", type=int, default=None, help="default 32000 (8000 with --layouts-only)"
    )
    ap.add_argument(
        "--hidden", type=int, default=None, help="default 256 (512 with --layouts-only)"
    )
    ap.add_argument("--layers", type=int, default=None, help="default 4 (8 with --layouts-only)")
    ap.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per run, warm-up included"
    )
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--no-trl-defaults", action="store_true", help="skip the TRL-defaults row")
    ap.add_argument("--layouts-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per contender run")
    ap.add_argument("--attention", default=UNSET, help="rlox attention: auto, dense or varlen")
    ap.add_argument("--logits-chunk-size", type=chunk_size, default=UNSET, help="auto or int")
    ap.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=UNSET
    )
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=UNSET)
    args = ap.parse_args(argv)
    small = not args.layouts_only
    args.profile = args.profile or ("both" if small else "hh")
    args.vocab = args.vocab or (32000 if small else 8000)
    args.hidden = args.hidden or (256 if small else 512)
    args.layers = args.layers or (4 if small else 8)
    if not 1 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 1 and below --steps")
    return args


def rlox_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in RLOX_OPTIONS if getattr(args, k) is not UNSET}


def contenders(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any] | str]]:
    """(name, setting, spec or the reason it cannot run)."""
    options = rlox_options(args)
    missing = [k for k, ok in supported_options(tuple(options)).items() if not ok]
    setting = ", ".join(f"{k}={v}" for k, v in options.items()) or "rlox defaults"
    rows: list[tuple[str, str, dict[str, Any] | str]] = []
    if not args.layouts_only:
        ckpt = bool(options.get("gradient_checkpointing", False))
        bf16 = args.dtype == "bf16"
        rows.append(
            (
                "TRL like-for-like",
                f"bf16={bf16}, grad ckpt={ckpt}",
                dict(contender="trl", bf16=bf16, checkpointing=ckpt),
            )
        )
        if not args.no_trl_defaults:
            rows.append(
                (
                    "TRL defaults",
                    "bf16=True, grad ckpt=True, its optim",
                    dict(contender="trl", bf16=True, checkpointing=True, default_optim=True),
                )
            )
    for layout in args.layouts.split(","):
        spec: dict[str, Any] | str = dict(contender="rlox", layout=layout, options=options)
        if missing:
            spec = f"n/a: rlox.DPO has no {', '.join(missing)}"
        rows.append((f"rlox {layout}", setting, spec))
    return rows


def measure(
    args: argparse.Namespace, setup: Setup
) -> list[tuple[str, str, list[dict[str, Any]] | str]]:
    """Run every contender ``--repeats`` times, interleaved; the results per contender."""
    rows = contenders(args)
    results: list[list[dict[str, Any]]] = [[] for _ in rows]
    for rep in range(args.repeats):
        for (name, _, spec), out in zip(rows, results, strict=True):
            if isinstance(spec, str):
                continue
            res = run_contender(dict(spec, setup=dataclasses.asdict(setup)), timeout=args.timeout)
            print(f"  repeat {rep + 1}/{args.repeats} {name}: {brief(res)}", flush=True)
            out.append(res)
    return [
        (name, setting, spec if isinstance(spec, str) else out)
        for (name, setting, spec), out in zip(rows, results, strict=True)
    ]


def brief(res: dict[str, Any]) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    return f"{res['tokens_per_s']:,.0f} tokens/s, {res['steps_per_s']:.3f} steps/s, warm-up {res['warmup_s']:.1f} s"


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def table(
    rows: list[tuple[str, str, list[dict[str, Any]] | str]], baseline: str, cuda: bool
) -> None:
    """Median tokens/s, steps/s, memory and ratios to the ``baseline`` row."""
    mem_key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    base = next((r for n, _, r in rows if n == baseline and not isinstance(r, str)), [])
    base_tps, base_mem = median(base, "tokens_per_s"), median(base, mem_key)
    base_sps = median(base, "steps_per_s")
    head = ["contender", "setting", "tokens/s", "steps/s", "peak RSS MiB", "RSS at start MiB"]
    head += ["CUDA peak MiB"] if cuda else []
    head += [f"tokens/s vs {baseline}", "steps/s vs it", "memory vs it"]
    lines = [head]
    for name, setting, runs in rows:
        if isinstance(runs, str) or not any("tokens_per_s" in r for r in runs):
            why = runs if isinstance(runs, str) else runs[0]["error"]
            lines.append([name, setting, why] + [""] * (len(head) - 3))
            continue
        tps, mem = median(runs, "tokens_per_s"), median(runs, mem_key)
        line = [name, setting, f"{tps:,.0f}", f"{median(runs, 'steps_per_s'):.3f}"]
        line += [f"{median(runs, 'peak_rss_mib'):,.0f}", f"{median(runs, 'train_rss_mib'):,.0f}"]
        line += [f"{median(runs, 'cuda_peak_mib'):,.0f}"] if cuda else []
        line += [
            f"{tps / base_tps:.2f}x" if base_tps else "-",
            f"{median(runs, 'steps_per_s') / base_sps:.2f}x" if base_sps else "-",
            f"{mem / base_mem:.2f}x" if base_mem else "-",
        ]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if k == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import torch
    import transformers
    import trl

    import rlox

    print(
        f"rlox {getattr(rlox, '__version__', '?')}, TRL {trl.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"device {args.device}, {args.threads} torch thread(s) per process"
    )
    profiles = ("ultrafeedback", "hh") if args.profile == "both" else (args.profile,)
    for profile in profiles:
        setup = Setup(
            profile=profile,
            vocab=args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            max_length=args.max_length,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            lr=args.lr,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
        )
        print(
            f"\n## {profile}: Llama hidden {setup.hidden} x {setup.layers} layers, vocab {setup.vocab}, "
            f"{param_count(setup) / 1e6:.1f}M parameters; {setup.batch} pairs/step, max_length "
            f"{setup.max_length}, {setup.dtype}, {setup.steps} steps ({setup.warmup} warm-up), "
            f"{args.repeats} repeats",
            flush=True,
        )
        rows = measure(args, setup)
        baseline = "rlox padded" if args.layouts_only else "TRL like-for-like"
        table(rows, baseline, args.device.startswith("cuda"))


if __name__ == "__main__":
    main()
