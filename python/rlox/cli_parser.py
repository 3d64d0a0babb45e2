"""The ``rlox`` argument parser: flags generated from option dataclasses, one-line usage errors.

``rlox train`` takes a flag for every field of :class:`~rlox.cli_config.TrainConfig`; ``rlox
prepare`` and ``rlox eval`` take those of :class:`PrepareOptions` and :class:`EvalOptions`. Each
option's value kind (:class:`~rlox.cli_config.Kind`) checks a flag while parsing, so a bad value
is reported with the flag's name. Parse errors raise :class:`~rlox.cli_config.UsageError`
instead of printing the usage and exiting.

The parser is plain :mod:`argparse`: ``transformers.HfArgumentParser`` derives a flag's type from
the field's annotation (no room for the value kinds and their messages, nor for ``str |
tuple[str, ...]``), adds an ``--under_score`` twin of every flag, turns booleans into ``--flag
[BOOL]``, fills every default into the namespace (a TOML file could no longer tell which flags
were given) and exits on errors with the full usage text.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlox.cli_config import GROUPS, LORA_FLAGS, TrainConfig, UsageError, flag_name, toml_value
from rlox.cli_kinds import (
    BadValue,
    Kind,
    choice_kind,
    device_kind,
    float_kind,
    int_kind,
    loss_type_kind,
    shard_kind,
)
from rlox.store_writer import DEFAULT_PART_TOKENS

__all__ = ["PROG", "EvalOptions", "PrepareOptions", "build_parser", "unrecognized"]

PROG = "rlox"


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
        except BadValue as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind.expected  # argparse names the type in some messages
    return convert


# -------------------------------------------------------------------- prepare / eval options
def option(
    default: Any = None,
    help: str = "",
    *,
    kind: Kind | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    required: bool = False,
) -> Any:
    """A field that is a flag: ``--name-with-dashes``, checked by ``kind`` (or ``choices``).

    ``metavar`` defaults to the kind's. The help text states the default itself. A field whose
    default is ``False`` (and no kind) is a switch.
    """
    meta = {"help": help, "kind": kind, "metavar": metavar, "choices": choices}
    return field(default=default, metadata=meta | {"required": required})


def switch(help: str) -> Any:
    """A ``--flag`` that sets the field to True."""
    return option(False, help)


_INT = int_kind()
_OPTIONAL_INT = int_kind(optional=True)


@dataclass(frozen=True)
class PrepareOptions:
    """The flags of ``rlox prepare``."""

    data: str = option(
        None,
        "input .jsonl or .parquet file, or a quoted glob of them (read in sorted order)",
        metavar="FILE_OR_GLOB",
        required=True,
    )
    tokenizer: str = option(
        None,
        "a tokenizer directory (transformers, e.g. the model directory) or a tokenizer.json",
        metavar="DIR_OR_JSON",
        required=True,
    )
    out: str = option(None, "directory of the store to write", metavar="STORE", required=True)
    shard: tuple[int, int] | None = option(
        None,
        "tokenize only slice I of N of the records into STORE/shard-IIIII-of-NNNNN; STORE opens "
        "as the whole store once all N are written (default: all records)",
        kind=shard_kind(),
    )
    resume: bool = switch("continue an interrupted prepare of STORE from its last written part")
    part_tokens: int = option(
        DEFAULT_PART_TOKENS,
        f"token ids held in memory before a part is written (default: {DEFAULT_PART_TOKENS})",
        kind=_INT,
    )
    max_length: int | None = option(
        1024,
        "sequence limit used for the truncation counts ('none': no limit; default: 1024)",
        kind=_OPTIONAL_INT,
    )
    max_prompt_length: int | None = option(
        None, "prompt limit used for the truncation counts (default: none)", kind=_OPTIONAL_INT
    )
    batch_size: int = option(
        64, "pairs per batch for the padding fractions (default: 64)", kind=_INT
    )
    tokenize_batch_size: int = option(
        1024, "records per call of the parallel tokenizer (default: 1024)", kind=_INT
    )
    no_eos: bool = switch("do not append EOS to standard-format completions")
    no_progress: bool = switch("hide the progress bar")
    json: bool = switch("print the summary as JSON")


@dataclass(frozen=True)
class EvalOptions:
    """The flags of ``rlox eval``."""

    model: str = option(None, "model directory to evaluate", metavar="DIR", required=True)
    data: str = option(None, "a store, or a .jsonl/.parquet file", metavar="STORE", required=True)
    ref_model: str | None = option(None, "reference model directory", metavar="DIR")
    tokenizer: str | None = option(
        None, "tokenizer for text data (default: the model's)", metavar="DIR_OR_JSON"
    )
    beta: float = option(0.1, "reward scale beta (default: 0.1)", kind=float_kind(0, lo_open=True))
    loss_type: str | tuple[str, ...] = option(
        "sigmoid", "loss to report (default: sigmoid)", kind=loss_type_kind()
    )
    batch_size: int = option(8, "pairs per batch (default: 8)", kind=_INT)
    max_tokens: int | None = option(
        None, "token budget per batch instead of --batch-size", kind=_OPTIONAL_INT
    )
    layout: str = option(
        "padded",
        "batch layout (default: padded)",
        choices=("padded", "packed", "prefix_shared"),
    )
    max_length: int | None = option(
        None,
        "truncate prompt + completion to N tokens (default: the smaller of the model's "
        "positions and the longest sequence in the data)",
        kind=_OPTIONAL_INT,
    )
    max_prompt_length: int | None = option(
        None, "truncate prompts to N tokens first (default: none)", kind=_OPTIONAL_INT
    )
    truncation: str = option(
        "keep_end",
        "which end of a prompt to keep (default: keep_end)",
        choices=("keep_end", "keep_start"),
    )
    dtype: str = option(
        "float32",
        "weight dtype (default: float32)",
        choices=("float32", "bfloat16", "float16", "auto"),
    )
    device: str = option(
        "auto", "torch device (default: cuda when available, else cpu)", kind=device_kind()
    )
    threads: int | None = option(None, "torch CPU threads", kind=_OPTIONAL_INT)
    precomputed_reference: bool = switch(
        "use the reference log-probs stored with the store (by 'rlox train "
        "--precompute-reference' or DPO.precompute_reference) instead of a reference model"
    )
    mixed_precision: str | None = option(
        None,
        "'bf16' autocast of the forwards (default: none)",
        kind=choice_kind(("bf16",), optional=True),
        metavar="{bf16,none}",
    )
    json: bool = switch("print the metrics as JSON")


def add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """A flag for each field of the dataclass ``options`` (made with :func:`option`)."""
    for f in dataclasses.fields(options):
        meta = f.metadata
        kind: Kind | None = meta["kind"]
        if f.default is False and kind is None:
            parser.add_argument(f"--{flag_name(f.name)}", action="store_true", help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if meta["required"]:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if kind is not None:
            kwargs["type"] = _config_flag_kind(kind)
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        metavar = meta["metavar"] or (kind.metavar if kind is not None else None)
        if metavar is not None:
            kwargs["metavar"] = metavar
        parser.add_argument(f"--{flag_name(f.name)}", **kwargs)


# ------------------------------------------------------------------------------ train options
def _config_flag_kind(kind: Kind) -> Callable[[str], Any]:
    """An argparse ``type`` that checks a flag value at parse time (error names the option)."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except BadValue as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind.expected  # argparse names the type in some messages
    return convert


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        group = groups[f.metadata["group"]]
        flag = f"--{flag_name(f.name)}"
        help_text = f.metadata["help"]
        if f.name == "lora":
            group.add_argument(
                "--lora",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help="train LoRA adapters instead of all weights (any --lora-* option implies "
                "it); other LoraConfig options go in a [lora] table of the config file",
            )
            for name, (key, kind, text) in LORA_FLAGS.items():
                group.add_argument(
                    f"--{flag_name(name)}",
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
            shown = toml_value(f.default).strip('"')
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


# ------------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rlox`` command (``args.command`` names the sub-command)."""
    from rlox import __version__

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
    for add in (_add_prepare, _add_train, _add_eval, _add_plot, _add_demo):
        add(sub)
    return parser


def _command(sub: Any, name: str, help: str, description: str, **kwargs: Any) -> Any:
    """A sub-command parser that also takes ``--debug`` after the command name."""
    p = sub.add_parser(
        name, formatter_class=_HelpFormatter, help=help, description=description, **kwargs
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    return p


def _add_prepare(sub: Any) -> None:
    p = _command(
        sub,
        "prepare",
        "tokenize preference pairs into a store",
        "Tokenize prompt/chosen/rejected records (.jsonl or .parquet files, standard or "
        "conversational format) into a memory-mappable preference store, streamed to disk part "
        "by part in bounded memory (--shard I/N for one slice of many), then print a summary: "
        "pairs, tokens, lengths, how many pairs --max-length truncates and the padding fraction "
        "of each batch layout at --batch-size.",
    )
    add_options(p, PrepareOptions)


def _add_train(sub: Any) -> None:
    p = _command(
        sub,
        "train",
        "train a Hugging Face model with DPO",
        "Train a local Hugging Face causal LM with DPO (all weights, or LoRA "
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


def _add_eval(sub: Any) -> None:
    p = _command(
        sub,
        "eval",
        "evaluate a model on preference pairs",
        "Print the DPO metrics of a model on preference pairs (no training): loss, "
        "reward accuracy and margin, chosen/rejected rewards and log-probs, over every pair. "
        "Rewards are measured against --ref-model, or the log-probs stored with the data "
        "(--precomputed-reference); for a directory of LoRA adapters, against its base model; "
        "otherwise against a zero reference.",
    )
    add_options(p, EvalOptions)


def _add_plot(sub: Any) -> None:
    p = _command(
        sub,
        "plot",
        "plot the training curves of a run",
        "Write PNG curves (loss, reward accuracy and margin, rewards, log-probs, "
        "learning rate, gradient norm; train and eval together) from RUN_DIR/metrics.jsonl and "
        "print their paths. Needs matplotlib.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (or its metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR/plots)")


def _add_demo(sub: Any) -> None:
    from rlox.demo import DESCRIPTION, add_arguments

    p = _command(
        sub,
        "demo",
        "train a tiny model with DPO on a built-in task",
        DESCRIPTION + " (the same as 'make demo' / python -m rlox.demo)",
    )
    add_arguments(p)


def unrecognized(parser: argparse.ArgumentParser, command: str, extra: Sequence[str]) -> UsageError:
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
