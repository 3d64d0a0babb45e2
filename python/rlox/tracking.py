"""Metric records of a training run: ``metrics.jsonl``, TensorBoard and one-line summaries.

Every record is one JSON object per line of ``<output_dir>/metrics.jsonl``::

    {"step": int, "epoch": float, "split": "train" | "eval", "time": float,
     "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
     "chosen_logps", "rejected_logps",
     "lr", "grad_norm", "skipped",          # train records only
     "loss_<name>", ...}                     # components of a multi-term loss

``time`` is seconds since the start of the run (continued across resumes); non-finite values are
written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "RECORD_METRICS",
    "MetricsWriter",
    "format_record",
    "make_record",
    "scalars",
]

METRICS_FILE = "metrics.jsonl"
RECORD_METRICS = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
)
TRAIN_ONLY = ("lr", "grad_norm", "skipped")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def make_record(
    split: str, step: int, epoch: float, time: float, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSONL record of ``metrics`` with exactly the schema's keys (plus ``loss_<name>``)."""
    record: dict[str, Any] = {
        "step": int(step),
        "epoch": float(epoch),
        "split": split,
        "time": float(time),
    }
    for key in RECORD_METRICS:
        record[key] = _clean(float(metrics.get(key, math.nan)))
    if split == "train":
        record["lr"] = _clean(float(metrics.get("lr", math.nan)))
        record["grad_norm"] = _clean(float(metrics.get("grad_norm", math.nan)))
        record["skipped"] = int(metrics.get("skipped", 0))
    for key in sorted(metrics):
        if key.startswith("loss_"):
            record[key] = _clean(float(metrics[key]))
    return record


def scalars(record: Mapping[str, Any]) -> dict[str, int | float]:
    """The numbers of ``record`` keyed ``<split>/<key>`` (``null`` values, step and time left out),
    as TensorBoard and the trackers of ``report_to`` log them at ``record["step"]``."""
    skip = ("step", "split", "time")
    return {
        f"{record['split']}/{key}": value
        for key, value in record.items()
        if key not in skip and isinstance(value, int | float)
    }


def format_record(record: Mapping[str, Any]) -> str:
    """One line: ``[train] step 20 epoch 1.25 | loss 0.6812 | reward_accuracy 0.625 | ...``."""

    def fmt(v: Any) -> str:
        if v is None:
            return "nan"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = f"[{record['split']}] step {record['step']} epoch {record['epoch']:.2f}"
    skip = {"step", "epoch", "split", "time"}
    body = " | ".join(f"{k} {fmt(v)}" for k, v in record.items() if k not in skip)
    return f"{head} | {body} | time {record['time']:.1f}s"


class MetricsWriter:
    """Appends records to ``output_dir/metrics.jsonl`` and, when ``torch.utils.tensorboard``
    imports, to a ``SummaryWriter`` in ``output_dir/tensorboard`` (scalars ``<split>/<key>``).

    ``resume_step``: continue a run from that step, dropping records of later steps (written
    before an interruption); ``None`` starts a new file.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the interruption
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (see :func:`make_record`)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in scalars(record).items():
                self._tb.add_scalar(tag, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
