"""The ``rlox`` command line: prepare preference data, train with DPO, evaluate, plot, demo.

Every sub-command reports a failure as one line on stderr: exit status 2 for a mistake in the
command line or the config file (unknown option or key, bad value, missing input), 1 for an error
while running. ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlox.tracking import RECORD_METRICS

__all__ = ["TrainConfig", "UsageError", "load_train_config", "main"]

PROG = "rlox"
TEXT_SUFFIXES = (".jsonl", ".parquet")


class UsageError(Exception):
    """A mistake in the command line or a config file (exit status 2)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


# ---------------------------------------------------------------------------------- values
class _Bad(ValueError):
    """A value that does not fit its option; the message says what was expected."""


_NONE_WORDS = frozenset({"none", "null"})


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _bad(expected: str, value: Any) -> _Bad:
    return _Bad(f"expected {expected}, got {value!r}")


@dataclass(frozen=True)
class Kind:
    """How an option's value is read from a flag (a string) or from TOML (a typed value)."""

    expected: str
    parse: Callable[[Any], Any]
    optional: bool = False
    metavar: str = "X"

    def __call__(self, value: Any) -> Any:
        if self.optional and _is_none(value):
            return None
        return self.parse(value)

    @property
    def description(self) -> str:
        return f"{self.expected} or 'none'" if self.optional else self.expected


def _real(value: Any, expected: str) -> float:
    if isinstance(value, bool):
        raise _bad(expected, value)
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise _bad(expected, value) from None
    else:
        raise _bad(expected, value)
    if not math.isfinite(out):
        raise _bad(expected, value)
    return out


def float_kind(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
    expected: str | None = None,
) -> Kind:
    if expected is None:
        if lo == 0 and lo_open and hi is None:
            expected = "a positive float"
        elif lo == 0 and hi is None:
            expected = "a non-negative float"
        elif lo is not None and hi is not None:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            expected = f"a float in {left}{lo:g}, {hi:g}{right}"
        else:
            expected = "a float"

    def parse(value: Any) -> float:
        out = _real(value, expected)
        if lo is not None and (out < lo or (lo_open and out == lo)):
            raise _bad(expected, value)
        if hi is not None and (out > hi or (hi_open and out == hi)):
            raise _bad(expected, value)
        return out

    return Kind(expected, parse, optional, "FLOAT")


def int_kind(minimum: int = 1, *, optional: bool = False) -> Kind:
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"

    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise _bad(expected, value)
        if isinstance(value, str):
            try:
                value_int = int(value.strip())
            except ValueError:
                raise _bad(expected, value) from None
        elif isinstance(value, int):
            value_int = value
        elif isinstance(value, float) and value.is_integer():
            value_int = int(value)
        else:
            raise _bad(expected, value)
        if value_int < minimum:
            raise _bad(expected, value)
        return value_int

    return Kind(expected, parse, optional, "N")


def bool_kind() -> Kind:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise _bad("true or false", value)

    return Kind("true or false", parse, False, "BOOL")


def choice_kind(choices: Sequence[str], *, optional: bool = False) -> Kind:
    expected = "one of " + ", ".join(repr(c) for c in choices)

    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _bad(expected, value)
        return value

    return Kind(expected, parse, optional, "{" + ",".join(choices) + "}")


def path_kind(*, optional: bool = False, expected: str = "a path") -> Kind:
    def parse(value: Any) -> str:
        if not isinstance(value, str | os.PathLike) or not str(value).strip():
            raise _bad(expected, value)
        return str(value)

    return Kind(expected, parse, optional, "PATH")


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def loss_type_kind() -> Kind:
    from rlox.losses import LOSS_TYPES

    expected = "a loss type or a list of them (" + ", ".join(LOSS_TYPES) + ")"

    def parse(value: Any) -> str | tuple[str, ...]:
        names = _split_list(value)
        if not names or not all(isinstance(n, str) and n in LOSS_TYPES for n in names):
            raise _bad(expected, value)
        return names[0] if len(names) == 1 and isinstance(value, str) else tuple(names)

    return Kind(expected, parse, False, "TYPE[,TYPE...]")


def float_list_kind(*, optional: bool = False) -> Kind:
    expected = "a list of non-negative floats"

    def parse(value: Any) -> tuple[float, ...]:
        items = _split_list(value)
        if not items:
            raise _bad(expected, value)
        out = tuple(_real(v, expected) for v in items)
        if any(v < 0 for v in out):
            raise _bad(expected, value)
        return out

    return Kind(expected, parse, optional, "W[,W...]")


def device_kind() -> Kind:
    expected = "'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1'"

    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise _bad(expected, value)
        if value == "auto":
            return value
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise _bad(expected, value) from None
        return value

    return Kind(expected, parse, False, "DEVICE")


def resume_kind() -> Kind:
    return Kind("'latest' or a checkpoint directory", path_kind().parse, True, "latest|DIR")


# --------------------------------------------------------------------------- train config
def _opt(kind: Kind, default: Any, help: str, group: str, **extra: Any) -> Any:
    return field(default=default, metadata={"kind": kind, "help": help, "group": group, **extra})


GROUPS = {
    "run": "model, data and run",
    "dpo": "DPO loss and optimizer",
    "fit": "training loop (DPO.fit)",
    "lora": "LoRA adapters (peft)",
}
# Paths that a config file gives relative to its own directory.
_PATH_FIELDS = ("model", "data", "eval_data", "tokenizer", "output_dir", "resume_from")
_LORA_FLAGS = {
    "lora_r": ("r", int_kind(), "adapter rank (peft default: 8)"),
    "lora_alpha": ("lora_alpha", float_kind(0, lo_open=True), "scale numerator (peft default: 8)"),
    "lora_dropout": (
        "lora_dropout",
        float_kind(0, 1, hi_open=True),
        "dropout on the adapter input",
    ),
    "lora_target_modules": (
        "target_modules",
        Kind("module names", _split_list, False, "NAME[,NAME...]"),
        "modules to adapt, comma-separated, or 'all-linear' (default: peft's choice for the "
        "architecture)",
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``rlox train`` needs; read from a TOML file and/or command-line flags.

    Field names are the TOML keys (flags: the same with dashes). LoRA options live in a
    ``[lora]`` table of ``peft.LoraConfig`` keywords (``lora = true`` for peft's defaults).
    """

    # run
    model: str | None = _opt(
        path_kind(),
        None,
        "model directory (config.json + safetensors, as written by save_pretrained); required",
        "run",
    )
    data: str | None = _opt(
        path_kind(),
        None,
        "training pairs: a store written by 'rlox prepare', or a .jsonl/.parquet file "
        "tokenized on the fly; required",
        "run",
    )
    eval_data: str | None = _opt(
        path_kind(optional=True), None, "evaluation pairs (a store or a text file)", "run"
    )
    eval_fraction: float = _opt(
        float_kind(0, 1, hi_open=True),
        0.0,
        "hold out this fraction of the training pairs for evaluation when eval_data is not set",
        "run",
    )
    tokenizer: str | None = _opt(
        path_kind(optional=True),
        None,
        "tokenizer directory or tokenizer.json for text data (unset: the model's)",
        "run",
    )
    output_dir: str | None = _opt(
        path_kind(),
        None,
        "run directory: metrics.jsonl, checkpoints/, final/ (the trained policy); required",
        "run",
    )
    dtype: str = _opt(
        choice_kind(("float32", "bfloat16", "float16", "auto")),
        "float32",
        "weight dtype ('auto': the checkpoint's)",
        "run",
    )
    device: str = _opt(device_kind(), "auto", "torch device ('auto': cuda when available)", "run")
    threads: int | None = _opt(
        int_kind(optional=True), None, "torch CPU threads (unset: torch's choice)", "run"
    )
    precompute_reference: bool = _opt(
        bool_kind(),
        False,
        "run the reference once over the data before training and keep its log-probs (saved "
        "with a store); without LoRA the reference copy is then freed",
        "run",
    )
    merge_lora: bool = _opt(
        bool_kind(),
        True,
        "with LoRA, save final/ as a plain model with the adapters merged (false: adapters only)",
        "run",
    )
    # DPO
    beta: float = _opt(
        float_kind(0, lo_open=True), 0.1, "KL strength; reward = beta*(pi-ref)", "dpo"
    )
    learning_rate: float = _opt(float_kind(0, lo_open=True), 1e-4, "peak learning rate", "dpo")
    max_grad_norm: float | None = _opt(
        float_kind(0, lo_open=True, optional=True),
        1.0,
        "clip the global gradient norm ('none': no clipping)",
        "dpo",
    )
    loss_type: str | tuple[str, ...] = _opt(
        loss_type_kind(), "sigmoid", "loss type, or several (comma-separated / a list)", "dpo"
    )
    loss_weights: tuple[float, ...] | None = _opt(
        float_list_kind(optional=True), None, "weights of several loss types", "dpo"
    )
    label_smoothing: float = _opt(
        float_kind(0, 0.5, hi_open=True), 0.0, "label smoothing / flip rate epsilon", "dpo"
    )
    f_divergence: str = _opt(
        choice_kind(("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")),
        "reverse_kl",
        "f-divergence of the margin losses",
        "dpo",
    )
    f_alpha_divergence_coef: float = _opt(float_kind(), 1.0, "alpha of alpha_divergence", "dpo")
    reference_free: bool = _opt(
        bool_kind(), False, "use a zero reference (no reference model)", "dpo"
    )
    simpo_gamma: float = _opt(float_kind(), 0.5, "SimPO target margin", "dpo")
    cpo_alpha: float = _opt(float_kind(), 1.0, "CPO NLL weight", "dpo")
    orpo_alpha: float = _opt(float_kind(), 0.1, "ORPO odds-ratio weight", "dpo")
    rpo_alpha: float | None = _opt(
        float_kind(0, optional=True), None, "RPO: add this weight times the chosen NLL", "dpo"
    )
    discopop_tau: float = _opt(float_kind(0, lo_open=True), 0.05, "DiscoPOP temperature", "dpo")
    ld_alpha: float | None = _opt(
        float_kind(0, 1, optional=True),
        None,
        "LD-DPO weight of tokens beyond the shorter completion",
        "dpo",
    )
    # fit
    epochs: int = _opt(int_kind(), 1, "passes over the training pairs", "fit")
    batch_size: int | None = _opt(
        int_kind(optional=True),
        None,
        "pairs per batch (unset: 8, or as many as max_tokens allows)",
        "fit",
    )
    max_tokens: int | None = _opt(
        int_kind(optional=True), None, "token budget per batch, padding included", "fit"
    )
    layout: str = _opt(
        choice_kind(("padded", "packed", "prefix_shared")), "padded", "batch layout", "fit"
    )
    max_length: int | None = _opt(
        int_kind(optional=True),
        1024,
        "truncate prompt + completion to this many tokens ('none': no truncation)",
        "fit",
    )
    max_prompt_length: int | None = _opt(
        int_kind(optional=True), None, "truncate prompts to this many tokens first", "fit"
    )
    truncation: str = _opt(
        choice_kind(("keep_end", "keep_start")), "keep_end", "which end of a prompt to keep", "fit"
    )
    pack_length: int | None = _opt(
        int_kind(optional=True), None, "packed layout: tokens per row (unset: max_length)", "fit"
    )
    pad_to_multiple_of: int | None = _opt(
        int_kind(optional=True),
        None,
        "pad batch lengths to a multiple of N (e.g. 64 with bf16 on a GPU: fewer kernel shapes)",
        "fit",
    )
    gradient_accumulation_steps: int = _opt(int_kind(), 1, "batches per optimizer step", "fit")
    lr_scheduler: str = _opt(
        choice_kind(("constant", "linear", "cosine")), "constant", "learning-rate schedule", "fit"
    )
    warmup_steps: int = _opt(int_kind(0), 0, "linear warm-up steps", "fit")
    weight_decay: float = _opt(float_kind(0), 0.0, "decoupled weight decay", "fit")
    mixed_precision: str | None = _opt(
        choice_kind(("bf16",), optional=True), None, "'bf16' autocast, or 'none'", "fit"
    )
    seed: int = _opt(int_kind(0), 0, "seed of the data order and torch", "fit")
    log_every: int = _opt(int_kind(), 10, "log train metrics every N steps", "fit")
    eval_every: int | None = _opt(
        int_kind(optional=True),
        None,
        "evaluate eval_data every N steps (unset: after each epoch)",
        "fit",
    )
    save_every: int | None = _opt(
        int_kind(optional=True), None, "checkpoint every N steps (unset: no checkpoints)", "fit"
    )
    save_total_limit: int | None = _opt(
        int_kind(optional=True), 3, "checkpoints kept ('none': all)", "fit"
    )
    resume_from: str | None = _opt(
        resume_kind(), None, "resume from 'latest' (in output_dir) or a checkpoint directory", "fit"
    )
    max_consecutive_skips: int = _opt(
        int_kind(), 10, "stop after this many skipped (non-finite) steps in a row", "fit"
    )
    progress: bool = _opt(bool_kind(), True, "show a progress bar", "fit")
    max_steps: int | None = _opt(
        int_kind(optional=True), None, "stop after this many optimizer steps", "fit"
    )
    # LoRA
    lora: Mapping[str, Any] | None = field(
        default=None,
        metadata={
            "kind": None,
            "help": "train LoRA adapters; a [lora] table of peft.LoraConfig options",
            "group": "lora",
        },
    )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def dpo_kwargs(self, pad_token_id: int | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`rlox.DPO` (besides the models)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["group"] == "dpo"
        }
        return out | {"pad_token_id": pad_token_id}

    def fit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`rlox.DPO.fit` (besides the datasets)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["group"] == "fit"
        }
        if out["batch_size"] is None and out["max_tokens"] is None:
            out["batch_size"] = 8
        out["output_dir"] = self.output_dir
        return out

    def to_toml(self) -> str:
        """The config as TOML that ``rlox train --config`` reads back (unset options omitted)."""
        lines = ["# rlox train config"]
        current = None
        for f in dataclasses.fields(self):
            if f.name == "lora":
                continue
            if f.metadata["group"] != current:
                current = f.metadata["group"]
                lines.append(f"\n# {GROUPS[current]}")
            value = getattr(self, f.name)
            if value is None and f.default is not None:
                lines.append(f'{f.name} = "none"')
            elif value is None:
                lines.append(f"# {f.name} = (unset)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        if self.lora is not None:
            lines.append(f"\n# {GROUPS['lora']}\n[lora]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in self.lora.items()]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(
                f"{path}: reading TOML on Python < 3.11 needs the tomli package (pip install tomli)"
            ) from None
    if not path.is_file():
        raise UsageError(f"config: {path} not found")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from None
    except OSError as e:
        raise UsageError(f"config: cannot read {path} ({e.strerror})") from None


def _unknown(name: str, known: Sequence[str], where: str, table: str = "") -> UsageError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{table}{close[0]}'?)" if close else ""
    return UsageError(f"{where}unknown key '{table}{name}'{hint}")


def _lora_table(value: Any, where: str) -> dict[str, Any] | None:
    if isinstance(value, bool):
        return {} if value else None
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}lora: expected true, false or a table of LoraConfig options")
    table = dict(value)
    known = _lora_config_keys()
    for key in table:
        if known is not None and key not in known:
            raise _unknown(key, sorted(known), where, "lora.")
    for name, kind, _ in _LORA_FLAGS.values():
        if name in table:
            try:
                table[name] = kind(table[name])
            except _Bad as e:
                raise UsageError(f"{where}lora.{name}: {e}") from None
    return table


def _lora_config_keys() -> frozenset[str] | None:
    """The keywords of ``peft.LoraConfig`` (None without peft: checked when the model loads)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    return frozenset(f.name for f in dataclasses.fields(LoraConfig) if f.init)


def load_train_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A validated :class:`TrainConfig` from a TOML file and flag-style overrides.

    ``overrides`` win over the file; their values may be strings (as typed on a command line).
    Relative paths in the file are taken relative to the file's directory. Raises
    :class:`UsageError` naming the file and key for an unknown key or a bad value.
    """
    names = TrainConfig.option_names()
    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path).expanduser()
        where = f"{file}: "
        raw = _read_toml(file)
        for key, value in raw.items():
            if key == "lora":
                values["lora"] = _lora_table(value, where)
                continue
            if key not in names:
                raise _unknown(key, names, where)
            try:
                value = kinds[key](value)
            except _Bad as e:
                raise UsageError(f"{where}{key}: {e}") from None
            if key in _PATH_FIELDS:
                value = _absolute(value, file.parent)
            values[key] = value
    lora_overrides: dict[str, Any] = {}
    lora_switch: bool | None = None
    for key, value in (overrides or {}).items():
        if key in _LORA_FLAGS:
            name, kind, _ = _LORA_FLAGS[key]
            try:
                lora_overrides[name] = kind(value)
            except _Bad as e:
                raise UsageError(f"lora.{name}: {e}") from None
            continue
        if key == "lora":
            lora_switch = bool_kind()(value)
            continue
        if key not in names:
            raise _unknown(key, names, "")
        try:
            values[key] = kinds[key](value)
        except _Bad as e:
            raise UsageError(f"{key}: {e}") from None
        if key in _PATH_FIELDS:
            values[key] = _absolute(values[key], Path.cwd())
    if lora_switch is False:
        values["lora"] = None
    elif lora_switch or lora_overrides:
        values["lora"] = dict(values.get("lora") or {}) | lora_overrides
    config = TrainConfig(**values)
    _check_train_config(config)
    return config


def _absolute(value: str | None, base: Path) -> str | None:
    """``value`` as an absolute path, relative ones taken from ``base`` ('latest' is kept)."""
    if value is None or value == "latest":
        return value
    return str((base / Path(value).expanduser()).resolve())


def _check_train_config(config: TrainConfig) -> None:
    for name in ("model", "data", "output_dir"):
        if getattr(config, name) is None:
            raise UsageError(
                f"{name}: required (set it in the config file or with --{_flag(name)})"
            )
    _check_model_dir(config.model, "model")
    _check_data(config.data, "data")
    if config.eval_data is not None:
        _check_data(config.eval_data, "eval_data")
    if config.tokenizer is not None and not Path(config.tokenizer).exists():
        raise UsageError(f"tokenizer: {config.tokenizer} not found")
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output_dir: {out} exists and is not a directory")
    if config.resume_from not in (None, "latest") and not Path(config.resume_from).is_dir():
        raise UsageError(f"resume_from: {config.resume_from} is not a directory")
    if config.loss_weights is not None:
        count = 1 if isinstance(config.loss_type, str) else len(config.loss_type)
        if len(config.loss_weights) != count:
            raise UsageError(
                f"loss_weights: expected {count} weight(s), one per loss type, got "
                f"{len(config.loss_weights)}"
            )
    from rlox.losses import check_loss_options

    options = {k: v for k, v in config.dpo_kwargs().items() if k not in _NOT_LOSS_OPTIONS}
    if isinstance(options["loss_type"], tuple):
        options["loss_type"] = list(options["loss_type"])
    if options["loss_weights"] is not None:
        options["loss_weights"] = list(options["loss_weights"])
    try:
        check_loss_options(**options)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if config.max_prompt_length is not None and config.max_length is not None:
        if config.max_prompt_length >= config.max_length:
            raise UsageError(
                f"max_prompt_length: must be below max_length ({config.max_length}), got "
                f"{config.max_prompt_length}"
            )


_NOT_LOSS_OPTIONS = frozenset({"learning_rate", "max_grad_norm", "ld_alpha", "pad_token_id"})


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_model_dir(path: str, option: str) -> None:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{option}: {p} {'is not a directory' if p.exists() else 'not found'}")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise UsageError(f"{option}: {p} holds no model (config.json missing)")


def _check_data(path: str, option: str) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        from rlox.data import META_FILE

        if not (p / META_FILE).is_file():
            raise UsageError(
                f"{option}: {p} is not a preference store ({META_FILE} missing; build one with "
                "'rlox prepare')"
            )
        return
    if not p.exists():
        raise UsageError(f"{option}: {p} not found")
    if p.suffix.lower() not in TEXT_SUFFIXES:
        raise UsageError(
            f"{option}: {p} must be a store directory or a {' / '.join(TEXT_SUFFIXES)} file"
        )


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


def _model_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------- sub-commands
def cmd_prepare(args: argparse.Namespace) -> int:
    from rlox.data import PreferenceDataset

    data = Path(args.data).expanduser()
    if not data.is_file():
        raise UsageError(f"--data: {data} not found")
    if data.suffix.lower() not in TEXT_SUFFIXES:
        raise UsageError(f"--data: {data} must be a {' or '.join(TEXT_SUFFIXES)} file")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    if args.max_prompt_length is not None and args.max_length is not None:
        if args.max_prompt_length >= args.max_length:
            raise UsageError(f"--max-prompt-length: must be below --max-length ({args.max_length})")
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    start = time.perf_counter()
    ds = PreferenceDataset.from_text(
        data,
        tokenizer,
        add_eos=not args.no_eos,
        batch_size=args.tokenize_batch_size,
        show_progress=not args.no_progress,
    )
    if len(ds) == 0:
        raise ValueError(f"--data: {data} holds no preference pairs")
    ds.save(out)
    seconds = time.perf_counter() - start
    summary = dataset_summary(
        ds,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    summary |= {"source": str(data), "store": str(out), "seconds": round(seconds, 3)}
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
        for name in (*TrainConfig.option_names(), *_LORA_FLAGS)
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
    positions = _model_positions(model)
    if positions is not None and (config.max_length is None or config.max_length > positions):
        raise UsageError(
            f"max_length: {config.max_length} exceeds the model's {positions} positions"
        )
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
        with trainer._one_reference_digest():  # the reference weights are hashed once
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

    options = {k: v for k, v in config.dpo_kwargs().items() if k not in _NOT_LOSS_OPTIONS}
    if isinstance(options["loss_type"], tuple):
        options["loss_type"] = list(options["loss_type"])
    if options["loss_weights"] is not None:
        options["loss_weights"] = list(options["loss_weights"])
    return not check_loss_options(**options)["needs_reference"]


EVAL_KEYS = RECORD_METRICS


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rlox import DPO
    from rlox.hf import is_peft_model, load_pretrained

    if args.precomputed_reference and args.ref_model is not None:
        raise UsageError("--precomputed-reference: give it or --ref-model, not both")
    _check_model_dir(args.model, "--model")
    if args.ref_model is not None:
        _check_model_dir(args.ref_model, "--ref-model")
    _check_data(args.data, "--data")
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
    positions = _model_positions(model)
    if positions is not None and (args.max_length is None or args.max_length > positions):
        raise UsageError(
            f"--max-length: {args.max_length} exceeds the model's {positions} positions"
        )
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


# ------------------------------------------------------------------------------ the parser
class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (``UsageError``) instead of usage text + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.removeprefix("argument ")
        raise UsageError(f"{message} (see '{self.prog} --help')", prog=self.prog)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description or epilog; keeps indented blocks as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.strip("\n").split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(
                    textwrap.fill(
                        " ".join(para.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
        return "\n\n".join(out)


def _config_flag_kind(kind: Kind) -> Callable[[str], Any]:
    """An argparse ``type`` that checks a flag value at parse time (error names the option)."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except _Bad as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind.expected  # argparse names the type in some messages
    return convert


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        group = groups[f.metadata["group"]]
        flag = f"--{_flag(f.name)}"
        help_text = f.metadata["help"]
        if f.name == "lora":
            group.add_argument(
                "--lora",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help="train LoRA adapters instead of all weights (any --lora-* option implies "
                "it); other LoraConfig options go in a [lora] table of the config file",
            )
            for name, (key, kind, text) in _LORA_FLAGS.items():
                group.add_argument(
                    f"--{_flag(name)}",
                    dest=name,
                    type=_config_flag_kind(kind),
                    metavar=kind.metavar,
                    default=argparse.SUPPRESS,
                    help=f"{text} [lora.{key}]",
                )
            continue
        kind: Kind = f.metadata["kind"]
        if "required" in help_text or f.default is None:
            suffix = ""  # the help text tells what an unset option means
        else:
            shown = _toml_value(f.default).strip('"')
            suffix = f" (default: {shown})"
        if kind.expected == "true or false":
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text}{suffix}",
            )
            continue
        names = [flag, "--lr"] if f.name == "learning_rate" else [flag]
        group.add_argument(
            *names,
            dest=f.name,
            type=_config_flag_kind(kind),
            metavar=kind.metavar,
            default=argparse.SUPPRESS,
            help=f"{help_text}{suffix}",
        )


TRAIN_EPILOG = """\
The config file is TOML with the option names above as keys (underscores), e.g.

    model = "models/base"          # relative paths: relative to this file
    data = "data/train-store"
    eval_fraction = 0.05
    output_dir = "runs/dpo"
    beta = 0.1
    learning_rate = 5e-6
    batch_size = 16
    max_length = 512
    lr_scheduler = "cosine"
    warmup_steps = 50

    [lora]                         # optional: peft.LoraConfig keywords
    r = 16
    lora_alpha = 32
    target_modules = ["q_proj", "v_proj"]

Flags override the file. 'none' unsets an optional value. Unknown keys and bad values are
reported with the key's name. The resolved config is written to OUTPUT_DIR/train_config.toml,
the metrics to OUTPUT_DIR/metrics.jsonl, checkpoints to OUTPUT_DIR/checkpoints/step-N/ and the
trained policy to OUTPUT_DIR/final/ (loadable with rlox.hf.load_pretrained).
"""

MAIN_EPILOG = """\
Run 'rlox COMMAND --help' for the options of a command.

Exit status: 0 success, 1 error while running, 2 bad command line or config file. Errors are
reported in one line; --debug shows the traceback.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rlox`` command."""
    from rlox import __version__

    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    parser = _Parser(
        prog=PROG,
        description="Rust-accelerated Direct Preference Optimization for causal language models.",
        epilog=MAIN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rlox {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "prepare",
        parents=[debug],
        formatter_class=_HelpFormatter,
        help="tokenize preference pairs into a store",
        description="Tokenize prompt/chosen/rejected records (.jsonl or .parquet, standard or "
        "conversational format) into a memory-mappable preference store, then print a summary: "
        "pairs, tokens, lengths, how many pairs --max-length truncates and the padding fraction "
        "of each batch layout at --batch-size.",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="input .jsonl or .parquet file")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR_OR_JSON",
        help="a tokenizer directory (transformers, e.g. the model directory) or a tokenizer.json",
    )
    p.add_argument("--out", required=True, metavar="STORE", help="directory of the store to write")
    p.add_argument(
        "--max-length",
        type=_config_flag_kind(int_kind(optional=True)),
        default=1024,
        metavar="N",
        help="sequence limit used for the truncation counts ('none': no limit; default: 1024)",
    )
    p.add_argument(
        "--max-prompt-length",
        type=_config_flag_kind(int_kind(optional=True)),
        default=None,
        metavar="N",
        help="prompt limit used for the truncation counts (default: none)",
    )
    p.add_argument(
        "--batch-size",
        type=_config_flag_kind(int_kind()),
        default=64,
        metavar="N",
        help="pairs per batch for the padding fractions (default: 64)",
    )
    p.add_argument(
        "--tokenize-batch-size",
        type=_config_flag_kind(int_kind()),
        default=1024,
        metavar="N",
        help="records per call of the parallel tokenizer (default: 1024)",
    )
    p.add_argument(
        "--no-eos", action="store_true", help="do not append EOS to standard-format completions"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        parents=[debug],
        formatter_class=_HelpFormatter,
        help="train a Hugging Face model with DPO",
        description="Train a local Hugging Face causal LM with DPO (all weights, or LoRA "
        "adapters) on a preference store or text file, against a frozen copy of the initial "
        "model (with LoRA: the model with its adapters disabled).",
        epilog=TRAIN_EPILOG,
    )
    p.add_argument("--config", metavar="RUN.toml", help="TOML config file (flags override it)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as TOML and exit without training",
    )
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        parents=[debug],
        formatter_class=_HelpFormatter,
        help="evaluate a model on preference pairs",
        description="Print the DPO metrics of a model on preference pairs (no training): loss, "
        "reward accuracy and margin, chosen/rejected rewards and log-probs, over every pair. "
        "Rewards are measured against --ref-model, or the log-probs stored with the data "
        "(--precomputed-reference); for a directory of LoRA adapters, against its base model; "
        "otherwise against a zero reference.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory to evaluate")
    p.add_argument(
        "--data", required=True, metavar="STORE", help="a store, or a .jsonl/.parquet file"
    )
    p.add_argument("--ref-model", metavar="DIR", help="reference model directory")
    p.add_argument(
        "--tokenizer", metavar="DIR_OR_JSON", help="tokenizer for text data (default: the model's)"
    )
    p.add_argument(
        "--beta",
        type=_config_flag_kind(float_kind(0, lo_open=True)),
        default=0.1,
        metavar="FLOAT",
        help="reward scale beta (default: 0.1)",
    )
    p.add_argument(
        "--loss-type",
        type=_config_flag_kind(loss_type_kind()),
        default="sigmoid",
        metavar="TYPE[,TYPE...]",
        help="loss to report (default: sigmoid)",
    )
    p.add_argument(
        "--batch-size",
        type=_config_flag_kind(int_kind()),
        default=8,
        metavar="N",
        help="pairs per batch (default: 8)",
    )
    p.add_argument(
        "--max-tokens",
        type=_config_flag_kind(int_kind(optional=True)),
        default=None,
        metavar="N",
        help="token budget per batch instead of --batch-size",
    )
    p.add_argument(
        "--layout",
        choices=("padded", "packed", "prefix_shared"),
        default="padded",
        help="batch layout (default: padded)",
    )
    p.add_argument(
        "--max-length",
        type=_config_flag_kind(int_kind(optional=True)),
        default=1024,
        metavar="N",
        help="truncate prompt + completion to N tokens (default: 1024)",
    )
    p.add_argument(
        "--max-prompt-length",
        type=_config_flag_kind(int_kind(optional=True)),
        default=None,
        metavar="N",
        help="truncate prompts to N tokens first (default: none)",
    )
    p.add_argument(
        "--truncation",
        choices=("keep_end", "keep_start"),
        default="keep_end",
        help="which end of a prompt to keep (default: keep_end)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        default="float32",
        help="weight dtype (default: float32)",
    )
    p.add_argument(
        "--device",
        type=_config_flag_kind(device_kind()),
        default="auto",
        help="torch device (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--threads",
        type=_config_flag_kind(int_kind(optional=True)),
        default=None,
        metavar="N",
        help="torch CPU threads",
    )
    p.add_argument(
        "--precomputed-reference",
        action="store_true",
        help="use the reference log-probs stored with the store (by 'rlox train "
        "--precompute-reference' or DPO.precompute_reference) instead of a reference model",
    )
    p.add_argument(
        "--mixed-precision",
        type=_config_flag_kind(choice_kind(("bf16",), optional=True)),
        default=None,
        metavar="{bf16,none}",
        help="'bf16' autocast of the forwards (default: none)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "plot",
        parents=[debug],
        formatter_class=_HelpFormatter,
        help="plot the training curves of a run",
        description="Write PNG curves (loss, reward accuracy and margin, rewards, log-probs, "
        "learning rate, gradient norm; train and eval together) from RUN_DIR/metrics.jsonl and "
        "print their paths. Needs matplotlib.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (or its metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)

    from rlox.demo import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "demo",
        parents=[debug],
        formatter_class=_HelpFormatter,
        help="train a tiny model with DPO on a built-in task",
        description=DESCRIPTION + " (the same as 'make demo' / python -m rlox.demo)",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _unrecognized(
    parser: argparse.ArgumentParser, command: str, extra: Sequence[str]
) -> UsageError:
    """The error for arguments no option takes, suggesting the closest option of the command."""
    sub = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(command, parser)
    options = [o for action in sub._actions for o in action.option_strings]
    word = extra[0].split("=", 1)[0]
    close = difflib.get_close_matches(word, options, n=1) if word.startswith("-") else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return UsageError(
        f"unrecognized argument {extra[0]!r}{hint} (see '{sub.prog} --help')", prog=sub.prog
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rlox`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = PROG
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unrecognized(parser, args.command, extra)
        args.debug = getattr(args, "debug", False)
        prog = f"{PROG} {args.command}"
        with _one_line_warnings(prog, enabled=not args.debug):
            return int(args.func(args) or 0)
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
