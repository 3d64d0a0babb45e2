"""Experiment trackers of :meth:`rlox.DPO.fit` (``report_to``): TensorBoard, W&B and MLflow.

``report_to`` names where the records of :mod:`rlox.tracking` go besides ``metrics.jsonl``:
``"tensorboard"`` (``output_dir/tensorboard``, written by :class:`~rlox.tracking.MetricsWriter`),
``"wandb"``, ``"mlflow"``, a list of them (or a comma-separated string), or ``"none"``. ``None``,
the default, keeps the earlier behaviour: TensorBoard when ``torch.utils.tensorboard`` imports.

Each client's own environment variables say where its records go (``WANDB_PROJECT``,
``WANDB_MODE``, ``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ...). A W&B
or MLflow run already active in the process is logged into and left open; otherwise ``fit``
starts one and finishes it when it returns or raises (marked failed).
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from rlox.tracking import scalars

__all__ = ["TRACKERS", "Trackers", "report_to_names", "require_trackers", "run_config"]

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The module each tracker imports, and the pip package that provides it.
_CLIENTS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def report_to_names(value: Any) -> tuple[str, ...] | None:
    """The trackers that ``report_to=value`` names, in order, each once.

    ``None`` stays ``None`` (the default: TensorBoard when installed); ``"none"`` and ``[]``
    give ``()``. Raises ``ValueError`` (``TypeError`` for a non-string) naming ``report_to``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise TypeError(
            f"report_to: expected a tracker name, a list of them or 'none', got "
            f"{type(value).__name__}"
        )
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"report_to: expected tracker names, got {bad[0]!r}")
    names = list(dict.fromkeys(v.strip().lower() for v in items))
    if names == ["none"]:
        return ()
    for name in names:
        if name not in TRACKERS:
            what = "'none' goes alone" if name == "none" else f"unknown tracker {name!r}"
            raise ValueError(
                f"report_to: {what}; expected one of {', '.join(TRACKERS)}, a list of them, "
                "or 'none'"
            )
    return tuple(names)


def require_trackers(names: tuple[str, ...] | None) -> None:
    """Import each tracker's client; ``ImportError`` naming the tracker and its pip package."""
    for name in names or ():
        module, package = _CLIENTS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"report_to: {name!r} needs the {package} package (pip install {package})"
            ) from e


def run_config(*configs: Any, **extra: Any) -> dict[str, Any]:
    """The fields of the dataclasses ``configs`` and ``extra``, as JSON values."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(asdict(config))
    merged.update(extra)
    return json.loads(json.dumps(merged, default=str))


class _Wandb:
    """A W&B run: ``wandb.init(config=...)``, ``run.log(scalars, step=)``, ``run.finish``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        import wandb

        self.own = wandb.run is None
        if self.own:
            self.run = wandb.init(config=dict(config))
        else:
            self.run = wandb.run
            self.run.config.update(dict(config), allow_val_change=True)

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self, failed: bool) -> None:
        if self.own:
            self.run.finish(exit_code=1 if failed else 0)


class _Mlflow:
    """An MLflow run: ``start_run``, ``log_params``, ``log_metrics(step=)``, ``end_run``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        self.own = mlflow.active_run() is None
        if self.own:
            mlflow.start_run()
        mlflow.log_params(dict(config))

    def log(self, record: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(scalars(record), step=int(record["step"]))

    def close(self, failed: bool) -> None:
        if self.own:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


_RUNS = {"wandb": _Wandb, "mlflow": _Mlflow}


class Trackers:
    """The W&B / MLflow runs of one ``fit`` (rank 0 only): each logs every record.

    ``names`` may include ``"tensorboard"``, which :class:`~rlox.tracking.MetricsWriter` serves.
    ``config`` (see :func:`run_config`) is logged once as the run's parameters.
    """

    def __init__(self, names: tuple[str, ...], config: Mapping[str, Any]) -> None:
        self.runs: list[Any] = []
        try:
            for name in names:
                if name in _RUNS:
                    self.runs.append(_RUNS[name](config))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, record: Mapping[str, Any]) -> None:
        """Send one record of :func:`rlox.tracking.make_record` to every run."""
        for run in self.runs:
            run.log(record)

    def close(self, failed: bool = False) -> None:
        """Finish the runs this object started (``failed``: marked so); every run is closed even
        if one raises, whose error is re-raised unless ``failed`` (then only warned)."""
        runs, self.runs = self.runs, []
        error: Exception | None = None
        for run in reversed(runs):
            try:
                run.close(failed)
            except Exception as e:
                error = error or e
        if error is not None:
            if not failed:
                raise error
            warnings.warn(f"report_to: closing a tracker failed: {error}", RuntimeWarning, 2)
