"""Training curves of an rlox run: ``metrics.jsonl`` to PNG figures (matplotlib, Agg canvas)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FIGURES", "plot_run", "read_metrics"]

SPLITS = ("train", "eval")
# file stem, title, y label, metric keys drawn on the same axes
FIGURES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("loss", "Loss", "loss", ("loss",)),
    ("reward_accuracy", "Reward accuracy", "fraction of pairs", ("reward_accuracy",)),
    ("reward_margin", "Reward margin", "chosen - rejected reward", ("reward_margin",)),
    ("rewards", "Implicit rewards", "beta * (policy - ref)", ("chosen_reward", "rejected_reward")),
    ("logps", "Completion log-probs", "summed log p", ("chosen_logps", "rejected_logps")),
    ("lr", "Learning rate", "learning rate", ("lr",)),
    ("grad_norm", "Gradient norm (before clipping)", "global norm", ("grad_norm",)),
)
_PLOTTED = frozenset(key for *_, keys in FIGURES for key in keys)
_COMPONENT_PREFIX = "loss_"
_SMOOTH_MIN_POINTS = 30  # train series at least this long also get a smoothed line
_UNSMOOTHED = frozenset({"lr"})  # a schedule, not a noisy measurement


@dataclass
class Metrics:
    """Series read from a ``metrics.jsonl``: ``series[split][key] = (steps, values)``."""

    path: Path
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)

    def get(self, split: str, key: str) -> tuple[list[float], list[float]] | None:
        """The (steps, values) of a metric, or None when it has no finite value."""
        data = self.series.get(split, {}).get(key)
        if data is None or not any(math.isfinite(v) for v in data[1]):
            return None
        return data

    def keys(self) -> set[str]:
        return {k for by_key in self.series.values() for k in by_key}


def _metrics_file(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir).expanduser()
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run_dir: {path} not found (a training run writes metrics.jsonl)")
    return path


def _number(value: Any, key: str, where: str) -> float:
    if value is None:
        return math.nan
    if not isinstance(value, int | float):
        raise ValueError(f"{where}: {key!r} must be a number or null, got {value!r}")
    return float(value)


def read_metrics(run_dir: str | os.PathLike[str]) -> Metrics:
    """Read ``run_dir/metrics.jsonl`` (or that file itself) into per-split series.

    Each line is a JSON object with ``step`` and ``split`` (``"train"`` or ``"eval"``); the
    metrics that are plotted (and ``loss_<name>`` terms) must be numbers or null, other keys are
    ignored, and so are blank lines. When a resumed run logged a step again, the later line
    wins. Raises ``ValueError`` naming the file and line number for a malformed line, and for a
    missing or empty file.
    """
    path = _metrics_file(run_dir)
    rows: dict[str, dict[float, dict[str, float]]] = {split: {} for split in SPLITS}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            split = record.get("split")
            if split not in SPLITS:
                raise ValueError(f"{where}: 'split' must be 'train' or 'eval', got {split!r}")
            if "step" not in record:
                raise ValueError(f"{where}: 'step' is missing")
            step = _number(record["step"], "step", where)
            if isinstance(record["step"], bool) or not math.isfinite(step):
                raise ValueError(f"{where}: 'step' must be a finite number, got {record['step']!r}")
            values = {
                key: _number(value, key, where)
                for key, value in record.items()
                if key in _PLOTTED or key.startswith(_COMPONENT_PREFIX)
            }
            rows[split][step] = values
    if not any(rows.values()):
        raise ValueError(f"{path}: holds no metrics (the file is empty)")
    metrics = Metrics(path)
    for split, by_step in rows.items():
        steps = sorted(by_step)
        keys = {k for values in by_step.values() for k in values}
        metrics.series[split] = {}
        for key in sorted(keys):
            points = [(s, by_step[s][key]) for s in steps if key in by_step[s]]
            metrics.series[split][key] = ([p[0] for p in points], [p[1] for p in points])
    return metrics


def _ema(values: list[float], points: int) -> list[float]:
    """Exponential moving average over the finite values (NaN stays NaN)."""
    alpha = 2.0 / (max(points // 10, 2) + 1)
    out, acc = [], math.nan
    for v in values:
        if math.isfinite(v):
            acc = v if not math.isfinite(acc) else alpha * v + (1 - alpha) * acc
            out.append(acc)
        else:
            out.append(math.nan)
    return out


def _draw(ax: Any, metrics: Metrics, keys: tuple[str, ...]) -> bool:
    drawn = False
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    for k, key in enumerate(keys):
        color = colors[k % len(colors)]
        label = key.replace("_", " ")
        train = metrics.get("train", key)
        if train is not None:
            steps, values = train
            if len(steps) >= _SMOOTH_MIN_POINTS and key not in _UNSMOOTHED:
                ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
                ax.plot(steps, _ema(values, len(steps)), color=color, label=f"train {label}")
            else:
                ax.plot(steps, values, color=color, label=f"train {label}")
            drawn = True
        evals = metrics.get("eval", key)
        if evals is not None:
            steps, values = evals
            ax.plot(
                steps,
                values,
                color=color,
                linestyle="--",
                marker="o",
                markersize=4,
                label=f"eval {label}",
            )
            drawn = True
    return drawn


def plot_run(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write PNG training curves of a run and return their paths.

    Reads ``run_dir/metrics.jsonl`` (``run_dir`` may also be that file) and writes into
    ``out_dir`` (default ``run_dir/plots``) one figure per metric group that the file holds:
    ``loss.png``, ``loss_components.png`` (the ``loss_<name>`` terms of a combined loss),
    ``reward_accuracy.png``, ``reward_margin.png``, ``rewards.png`` (chosen and rejected),
    ``logps.png`` (chosen and rejected), ``lr.png`` and ``grad_norm.png``. Train and eval series
    share the axes (eval dashed, with markers); measured train series of 30 points or more are
    drawn faintly with an exponential moving average over them. A figure whose metrics are absent is
    not written.

    Raises:
        ValueError naming the file (and line number) when it is missing, empty or malformed.
        ImportError when matplotlib is not installed.
    """
    metrics = read_metrics(run_dir)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot: needs matplotlib (pip install 'rlox[plot]' or pip install matplotlib)"
        ) from None
    out = Path(out_dir).expanduser() if out_dir is not None else metrics.path.parent / "plots"
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    components = tuple(sorted(k for k in metrics.keys() if k.startswith(_COMPONENT_PREFIX)))
    figures = list(FIGURES)
    if components:
        figures.insert(1, ("loss_components", "Loss components", "loss", components))
    written = []
    for stem, title, ylabel, keys in figures:
        fig = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if not _draw(ax, metrics, keys):
            continue
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if stem == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(loc="best", fontsize="small")
        target = out / f"{stem}.png"
        fig.savefig(target, format="png")
        written.append(target)
    return written
