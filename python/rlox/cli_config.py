"""The ``rlox train`` config: :class:`TrainConfig`, its TOML file and checks.

Option values are read by the kinds of :mod:`rlox.cli_kinds`. :class:`TrainConfig` holds every option of
``rlox train``; the options it shares with :class:`rlox.DPO` and :meth:`rlox.DPO.fit` take their
defaults (and, for ``fit``, their help) from :class:`~rlox.train.config.DPOConfig` and
:class:`~rlox.train.config.FitConfig`. :func:`load_train_config` merges a TOML file with flag
overrides and validates the result, raising :class:`UsageError` (exit status 2) with the file and
key in a one-line message.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlox.cli_kinds import (
    BadValue,
    Kind,
    bool_kind,
    choice_kind,
    device_kind,
    float_kind,
    float_list_kind,
    int_kind,
    loss_type_kind,
    path_kind,
    report_to_kind,
    resume_kind,
    split_list,
)
from rlox.train.config import LR_SCHEDULERS, DPOConfig, FitConfig

__all__ = [
    "GROUPS",
    "LORA_FLAGS",
    "TEXT_SUFFIXES",
    "BadValue",
    "Kind",
    "TrainConfig",
    "UsageError",
    "check_data",
    "check_model_dir",
    "flag_name",
    "load_train_config",
    "toml_value",
]

TEXT_SUFFIXES = (".jsonl", ".parquet")


class UsageError(Exception):
    """A mistake in the command line or a config file (exit status 2)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


# --------------------------------------------------------------------------- train config
def _opt(kind: Kind | None, default: Any, help: str, group: str) -> Any:
    return field(default=default, metadata={"kind": kind, "help": help, "group": group})


_DPO_FIELDS = {f.name: f for f in dataclasses.fields(DPOConfig)}
_FIT_FIELDS = {f.name: f for f in dataclasses.fields(FitConfig)}


def _dpo(name: str, kind: Kind, help: str) -> Any:
    """An option of :class:`rlox.DPO`, with the default of :class:`DPOConfig` (which has no help)."""
    return _opt(kind, _DPO_FIELDS[name].default, help, "dpo")


def _fit(name: str, kind: Kind, help: str | None = None) -> Any:
    """An option of :meth:`rlox.DPO.fit`: the default and help of :class:`FitConfig`.

    ``help`` replaces the library's help where the command line has more to say (what an unset
    value means here, or a default that differs from the library's).
    """
    f = _FIT_FIELDS[name]
    return _opt(kind, f.default, help or f.metadata["help"], "fit")


GROUPS = {
    "run": "model, data and run",
    "dpo": "DPO loss and optimizer",
    "fit": "training loop (DPO.fit)",
    "lora": "LoRA adapters (peft)",
}
# Paths that a config file gives relative to its own directory.
_PATH_FIELDS = ("model", "data", "eval_data", "tokenizer", "output_dir", "resume_from")
LORA_FLAGS = {
    "lora_r": ("r", int_kind(), "adapter rank (peft default: 8)"),
    "lora_alpha": ("lora_alpha", float_kind(0, lo_open=True), "scale numerator (peft default: 8)"),
    "lora_dropout": (
        "lora_dropout",
        float_kind(0, 1, hi_open=True),
        "dropout on the adapter input",
    ),
    "lora_target_modules": (
        "target_modules",
        Kind("module names", split_list, False, "NAME[,NAME...]"),
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
    # DPO (defaults: those of DPOConfig)
    beta: float = _dpo("beta", float_kind(0, lo_open=True), "KL strength; reward = beta*(pi-ref)")
    learning_rate: float = _dpo("learning_rate", float_kind(0, lo_open=True), "peak learning rate")
    max_grad_norm: float | None = _dpo(
        "max_grad_norm",
        float_kind(0, lo_open=True, optional=True),
        "clip the global gradient norm ('none': no clipping)",
    )
    loss_type: str | tuple[str, ...] = _dpo(
        "loss_type", loss_type_kind(), "loss type, or several (comma-separated / a list)"
    )
    loss_weights: tuple[float, ...] | None = _dpo(
        "loss_weights", float_list_kind(optional=True), "weights of several loss types"
    )
    label_smoothing: float = _dpo(
        "label_smoothing", float_kind(0, 0.5, hi_open=True), "label smoothing / flip rate epsilon"
    )
    f_divergence: str = _dpo(
        "f_divergence",
        choice_kind(("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")),
        "f-divergence of the margin losses",
    )
    f_alpha_divergence_coef: float = _dpo(
        "f_alpha_divergence_coef", float_kind(), "alpha of alpha_divergence"
    )
    reference_free: bool = _dpo(
        "reference_free", bool_kind(), "use a zero reference (no reference model)"
    )
    simpo_gamma: float = _dpo("simpo_gamma", float_kind(), "SimPO target margin")
    cpo_alpha: float = _dpo("cpo_alpha", float_kind(), "CPO NLL weight")
    orpo_alpha: float = _dpo("orpo_alpha", float_kind(), "ORPO odds-ratio weight")
    rpo_alpha: float | None = _dpo(
        "rpo_alpha", float_kind(0, optional=True), "RPO: add this weight times the chosen NLL"
    )
    discopop_tau: float = _dpo("discopop_tau", float_kind(0, lo_open=True), "DiscoPOP temperature")
    ld_alpha: float | None = _dpo(
        "ld_alpha",
        float_kind(0, 1, optional=True),
        "LD-DPO weight of tokens beyond the shorter completion",
    )
    disable_dropout: bool = _dpo(
        "disable_dropout", bool_kind(), "set every dropout probability of both models to 0"
    )
    use_weighting: bool = _dpo(
        "use_weighting", bool_kind(), "WPO: weight each pair by its completions' probabilities"
    )
    sync_ref_model: bool = _dpo(
        "sync_ref_model", bool_kind(), "TR-DPO: move the reference toward the policy"
    )
    ref_model_mixup_alpha: float = _dpo(
        "ref_model_mixup_alpha",
        float_kind(0, 1, lo_open=True),
        "TR-DPO: reference = alpha * policy + (1 - alpha) * reference",
    )
    ref_model_sync_steps: int = _dpo(
        "ref_model_sync_steps", int_kind(), "TR-DPO: mix the reference every N optimizer steps"
    )
    bco_running_mean: bool = _dpo(
        "bco_running_mean", bool_kind(), "bco_pair: shift rewards by their running mean"
    )
    attention: str = _dpo(
        "attention",
        choice_kind(("auto", "flex", "varlen", "dense", "eager")),
        "how packed / prefix_shared rows attend: auto (the first route the probe finds exact), "
        "flex (CUDA), varlen, dense or eager",
    )
    logits_chunk_size: int | None = _dpo(
        "logits_chunk_size",
        int_kind(0, optional=True),
        "LM-head rows per chunk (default: by vocabulary size; 0: all at once)",
    )
    gradient_checkpointing: bool = _dpo(
        "gradient_checkpointing", bool_kind(), "recompute the policy's activations in backward"
    )
    activation_offloading: bool = _dpo(
        "activation_offloading", bool_kind(), "saved activations in pinned CPU memory (CUDA)"
    )
    compile: bool = _dpo("compile", bool_kind(), "torch.compile the model forwards")
    router_aux_loss_coef: float | None = _dpo(
        "router_aux_loss_coef",
        float_kind(0, optional=True),
        "weight of a mixture-of-experts router loss (unset: the model config's; 0: off)",
    )
    # fit (defaults and, unless the command line needs to say more, help: those of FitConfig)
    epochs: int = _fit("epochs", int_kind())
    batch_size: int | None = _fit(
        "batch_size",
        int_kind(optional=True),
        "pairs per batch (unset: 8, or as many as max_tokens allows)",
    )
    max_tokens: int | None = _fit(
        "max_tokens", int_kind(optional=True), "token budget per batch, padding included"
    )
    layout: str = _fit("layout", choice_kind(("padded", "packed", "prefix_shared")))
    max_length: int | None = _fit(
        "max_length",
        int_kind(optional=True),
        "truncate prompt + completion to this many tokens (unset: the smaller of the model's "
        "positions and the longest sequence in the data)",
    )
    max_prompt_length: int | None = _fit("max_prompt_length", int_kind(optional=True))
    truncation: str = _fit("truncation", choice_kind(("keep_end", "keep_start")))
    pack_length: int | None = _fit("pack_length", int_kind(optional=True))
    pad_to_multiple_of: int | None = _fit(
        "pad_to_multiple_of",
        int_kind(optional=True),
        "pad batch lengths to a multiple of N (e.g. 64 with bf16 on a GPU: fewer kernel shapes)",
    )
    gradient_accumulation_steps: int = _fit("gradient_accumulation_steps", int_kind())
    lr_scheduler: str = _fit("lr_scheduler", choice_kind(LR_SCHEDULERS))
    warmup_steps: int = _fit("warmup_steps", int_kind(0))
    weight_decay: float = _fit("weight_decay", float_kind(0))
    mixed_precision: str | None = _fit("mixed_precision", choice_kind(("bf16",), optional=True))
    seed: int = _fit("seed", int_kind(0), "seed of the data order and torch")
    log_every: int = _fit("log_every", int_kind())
    eval_every: int | None = _fit(
        "eval_every",
        int_kind(optional=True),
        "evaluate eval_data every N steps (unset: after each epoch)",
    )
    save_every: int | None = _fit(
        "save_every", int_kind(optional=True), "checkpoint every N steps (unset: no checkpoints)"
    )
    save_total_limit: int | None = _fit(
        "save_total_limit", int_kind(optional=True), "checkpoints kept ('none': all)"
    )
    resume_from: str | None = _fit("resume_from", resume_kind())
    max_consecutive_skips: int = _fit("max_consecutive_skips", int_kind())
    progress: bool = _fit("progress", bool_kind())
    max_steps: int | None = _fit("max_steps", int_kind(optional=True))
    report_to: str | tuple[str, ...] | None = _fit(
        "report_to",
        report_to_kind(),
        "experiment trackers: tensorboard, wandb, mlflow, comma-separated, or 'none' (unset: "
        "TensorBoard when installed); their environment variables (WANDB_PROJECT, "
        "MLFLOW_TRACKING_URI, ...) say where records go",
    )
    # LoRA
    lora: Mapping[str, Any] | None = _opt(
        None, None, "train LoRA adapters; a [lora] table of peft.LoraConfig options", "lora"
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

    def loss_options(self) -> dict[str, Any]:
        """Keyword options of :func:`rlox.losses.dpo_loss` (lists where TOML gave lists)."""
        return DPOConfig(**self.dpo_kwargs()).loss_options()

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
                lines.append(f"{f.name} = {toml_value(value)}")
        if self.lora is not None:
            lines.append(f"\n# {GROUPS['lora']}\n[lora]")
            lines += [f"{k} = {toml_value(v)}" for k, v in self.lora.items()]
        return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
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
    for name, kind, _ in LORA_FLAGS.values():
        if name in table:
            try:
                table[name] = kind(table[name])
            except BadValue as e:
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
            except BadValue as e:
                raise UsageError(f"{where}{key}: {e}") from None
            if key in _PATH_FIELDS:
                value = _absolute(value, file.parent)
            values[key] = value
    lora_overrides: dict[str, Any] = {}
    lora_switch: bool | None = None
    for key, value in (overrides or {}).items():
        if key in LORA_FLAGS:
            name, kind, _ = LORA_FLAGS[key]
            try:
                lora_overrides[name] = kind(value)
            except BadValue as e:
                raise UsageError(f"lora.{name}: {e}") from None
            continue
        if key == "lora":
            lora_switch = bool_kind()(value)
            continue
        if key not in names:
            raise _unknown(key, names, "")
        try:
            values[key] = kinds[key](value)
        except BadValue as e:
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
                f"{name}: required (set it in the config file or with --{flag_name(name)})"
            )
    check_model_dir(config.model, "model")
    check_data(config.data, "data")
    if config.eval_data is not None:
        check_data(config.eval_data, "eval_data")
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

    try:
        check_loss_options(**config.loss_options())
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if config.max_prompt_length is not None and config.max_length is not None:
        if config.max_prompt_length >= config.max_length:
            raise UsageError(
                f"max_prompt_length: must be below max_length ({config.max_length}), got "
                f"{config.max_prompt_length}"
            )


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def check_model_dir(path: str, option: str) -> None:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{option}: {p} {'is not a directory' if p.exists() else 'not found'}")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise UsageError(f"{option}: {p} holds no model (config.json missing)")


def check_data(path: str, option: str) -> None:
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
