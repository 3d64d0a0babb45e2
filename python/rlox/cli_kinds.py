"""Option value kinds of the command line and its config files.

A value kind (:class:`Kind`) reads an option from a command-line string or a typed TOML value and
says what it expected when the value does not fit (:class:`BadValue`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlox.trackers import TRACKERS, report_to_names

__all__ = [
    "BadValue",
    "Kind",
    "bool_kind",
    "choice_kind",
    "device_kind",
    "float_kind",
    "float_list_kind",
    "int_kind",
    "is_none",
    "loss_type_kind",
    "path_kind",
    "report_to_kind",
    "resume_kind",
    "shard_kind",
    "split_list",
]


class BadValue(ValueError):
    """A value that does not fit its option; the message says what was expected."""


_NONE_WORDS = frozenset({"none", "null"})


def is_none(value: Any) -> bool:
    """Whether ``value`` means unset (None, "none", "null")."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _bad(expected: str, value: Any) -> BadValue:
    return BadValue(f"expected {expected}, got {value!r}")


@dataclass(frozen=True)
class Kind:
    """How an option's value is read from a flag (a string) or from TOML (a typed value)."""

    expected: str
    parse: Callable[[Any], Any]
    optional: bool = False
    metavar: str = "X"

    def __call__(self, value: Any) -> Any:
        if self.optional and is_none(value):
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


def split_list(value: Any) -> list[Any]:
    """A list as given, or a comma-separated string split into its items."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def loss_type_kind() -> Kind:
    from rlox.losses import LOSS_TYPES

    expected = "a loss type or a list of them (" + ", ".join(LOSS_TYPES) + ")"

    def parse(value: Any) -> str | tuple[str, ...]:
        names = split_list(value)
        if not names or not all(isinstance(n, str) and n in LOSS_TYPES for n in names):
            raise _bad(expected, value)
        return names[0] if len(names) == 1 and isinstance(value, str) else tuple(names)

    return Kind(expected, parse, False, "TYPE[,TYPE...]")


def float_list_kind(*, optional: bool = False) -> Kind:
    expected = "a list of non-negative floats"

    def parse(value: Any) -> tuple[float, ...]:
        items = split_list(value)
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


def report_to_kind() -> Kind:
    expected = "a tracker (" + ", ".join(TRACKERS) + "), a list of them, or 'none'"

    def parse(value: Any) -> str | tuple[str, ...]:
        try:
            names = report_to_names(value)
        except (TypeError, ValueError):
            raise _bad(expected, value) from None
        if not names:
            return "none"
        return names[0] if len(names) == 1 else names

    return Kind(expected, parse, False, "NAME[,NAME...]")


def resume_kind() -> Kind:
    return Kind("'latest' or a checkpoint directory", path_kind().parse, True, "latest|DIR")


def shard_kind() -> Kind:
    """``I/N``: the I-th (from 0) of N slices, as ``(I, N)``."""
    expected = "I/N with 0 <= I < N"

    def parse(value: Any) -> tuple[int, int]:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            index, count = value
        else:
            try:
                index, count = (int(x) for x in str(value).split("/"))
            except ValueError:
                raise _bad(expected, value) from None
        if isinstance(index, bool) or not (0 <= int(index) < int(count)):
            raise _bad(expected, value)
        return int(index), int(count)

    return Kind(expected, parse, True, "I/N")
