"""report_to: W&B (offline) and MLflow (local file store) get the records of metrics.jsonl.

Nothing here reaches the network: W&B runs in offline mode and MLflow writes to ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from rlox import DPO, PreferenceDataset
from rlox.cli_config import TrainConfig
from rlox.models import TinyCausalLM, TinyLMConfig
from rlox.trackers import report_to_names
from rlox.train.config import FitConfig

VOCAB = 32
EXPERIMENT = "rlox-test"


def make_dataset(n: int = 12, seed: int = 0) -> PreferenceDataset:
    rng = random.Random(seed)

    def rows() -> list[list[int]]:
        return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 5))] for _ in range(n)]

    return PreferenceDataset.from_lists(rows(), rows(), rows())


def make_trainer() -> DPO:
    def model() -> TinyCausalLM:
        torch.manual_seed(0)
        return TinyCausalLM(
            TinyLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
        )

    return DPO(model(), model(), learning_rate=1e-2)


FIT = {"epochs": 2, "batch_size": 4, "log_every": 2, "eval_every": 3, "progress": False}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """W&B offline under tmp_path/wandb, MLflow's file store in tmp_path/mlruns."""
    (tmp_path / "wandb").mkdir()
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_PROJECT": EXPERIMENT,
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_X_DISABLE_STATS": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
    }.items():
        monkeypatch.setenv(key, value)
    yield tmp_path
    wandb = sys.modules.get("wandb")  # None while a test hides it
    if wandb is not None:
        wandb.teardown()  # W&B reads its settings once per process setup


def expected_scalars(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as ``{step: {"<split>/<key>": value}}`` (nulls, step and time left out)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        row = by_step.setdefault(record["step"], {})
        for key, value in record.items():
            if key not in ("step", "split", "time") and value is not None:
                row[f"{record['split']}/{key}"] = value
    return by_step


# ------------------------------------------------------------------------------ reading back
def mlflow_runs() -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    return sorted(runs, key=lambda r: r.info.start_time)


def mlflow_history(run) -> dict[int, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    by_step: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            by_step.setdefault(metric.step, {})[key] = metric.value
    return by_step


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a LevelDB-style log of 32 KiB blocks whose
    chunks carry a 7-byte header (zlib CRC-32 seeded with the type byte, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # the padding at the end of a block
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc
        parts.append(payload)
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_run(root: Path) -> tuple[dict[int, dict[str, float]], dict, int]:
    """History ``{step: {key: value}}``, config and exit code of the one offline run."""
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict[str, float]] = {}
    config: dict = {}
    exit_code = None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return history, config, exit_code


# ------------------------------------------------------------------------------------ tests
def test_wandb_and_mlflow_get_the_records_of_metrics_jsonl(env):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    trainer = make_trainer()
    out = env / "run"
    trainer.fit(
        make_dataset(12),
        make_dataset(5, seed=3),
        output_dir=out,
        report_to=["wandb", "mlflow"],
        **FIT,
    )
    expected = expected_scalars(out)
    assert sorted(expected) == [2, 3, 4, 6]
    assert {"train/loss", "train/lr", "train/skipped", "eval/reward_accuracy"} <= set(expected[6])
    assert not (out / "tensorboard").exists()  # a list names every tracker

    fit_options = {f.name for f in dataclasses.fields(FitConfig)}
    dpo_options = set(dataclasses.asdict(trainer.config))

    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    assert mlflow_history(run) == expected
    params = run.data.params
    assert set(params) == fit_options | dpo_options | {"world_size"}
    assert params["beta"] == str(trainer.config.beta)
    assert params["epochs"] == "2" and params["world_size"] == "1"
    assert params["report_to"] == str(["wandb", "mlflow"])

    sys.modules["wandb"].teardown()  # the W&B service writes the offline file out
    history, config, exit_code = wandb_run(env / "wandb")
    assert history == expected
    assert exit_code == 0
    config.pop("_wandb", None)
    assert set(config) == fit_options | dpo_options | {"world_size"}
    assert config["beta"] == trainer.config.beta and config["batch_size"] == 4
    assert config["output_dir"] == str(out)


def test_failed_fit_closes_its_run_and_a_resume_starts_a_new_one(env):
    pytest.importorskip("mlflow")
    out = env / "run"
    kw = dict(FIT, log_every=1, eval_every=None, save_every=1, output_dir=out, report_to="mlflow")

    def stop(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer().fit(make_dataset(12), callback=stop, **kw)
    make_trainer().fit(make_dataset(12), resume_from="latest", **kw)
    first, second = mlflow_runs()
    assert (first.info.status, second.info.status) == ("FAILED", "FINISHED")
    assert sorted(mlflow_history(first)) == [1, 2]
    assert sorted(mlflow_history(second)) == [3, 4, 5, 6]
    assert mlflow_history(first) | mlflow_history(second) == expected_scalars(out)


def test_none_and_the_default(env):
    out = env / "none"
    make_trainer().fit(make_dataset(8), output_dir=out, report_to="none", **FIT)
    assert (out / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists()
    assert not any((env / "wandb").iterdir()) and not (env / "mlruns").exists()
    out = env / "default"  # None: TensorBoard when installed, as before report_to
    make_trainer().fit(make_dataset(8), output_dir=out, **FIT)
    assert (out / "metrics.jsonl").is_file() and any((out / "tensorboard").iterdir())


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (None, None),
        ("none", ()),
        ("None", ()),
        ([], ()),
        ("wandb", ("wandb",)),
        ("wandb, mlflow", ("wandb", "mlflow")),
        (["mlflow", "tensorboard", "mlflow"], ("mlflow", "tensorboard")),
        (("tensorboard",), ("tensorboard",)),
    ],
)
def test_report_to_names(value, names):
    assert report_to_names(value) == names


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("tensorbord", ValueError, "unknown tracker 'tensorbord'"),
        (["wandb", "none"], ValueError, "'none' goes alone"),
        ("all", ValueError, "unknown tracker 'all'"),
        (1, TypeError, "got int"),
        (["wandb", 2], TypeError, "got 2"),
    ],
)
def test_bad_report_to_fails_before_training(value, error, message):
    trainer = make_trainer()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(error, match=f"report_to: .*{message}"):
        trainer.fit(make_dataset(8), report_to=value, **FIT)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_tensorboard_needs_output_dir():
    with pytest.raises(ValueError, match="output_dir: report_to='tensorboard'"):
        make_trainer().fit(make_dataset(8), report_to="tensorboard", **FIT)


@pytest.mark.parametrize(
    ("tracker", "module", "package"),
    [
        ("wandb", "wandb", "wandb"),
        ("mlflow", "mlflow", "mlflow"),
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
    ],
)
def test_missing_client_fails_before_training(env, monkeypatch, tracker, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    calls = []
    with pytest.raises(ImportError, match=rf"report_to: '{tracker}'.*pip install {package}"):
        make_trainer().fit(
            make_dataset(8),
            output_dir=env / "run",
            report_to=[tracker],
            callback=lambda step, m: calls.append(step),
            **FIT,
        )
    assert calls == [] and not (env / "run").exists()


def test_only_rank_zero_reports(env, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import rlox.train.loop

    monkeypatch.setattr(rlox.train.loop, "rank_world", lambda: (1, 2))
    result = make_trainer().fit(make_dataset(8), report_to="wandb,mlflow", **FIT)
    assert result.steps > 0
    assert not any((env / "wandb").iterdir()) and not (env / "mlruns").exists()


def test_cli_kind():
    kind = {f.name: f for f in dataclasses.fields(TrainConfig)}["report_to"].metadata["kind"]
    assert kind("wandb") == "wandb"
    assert kind("wandb,mlflow") == ("wandb", "mlflow")
    assert kind(["mlflow"]) == "mlflow"
    assert kind("none") == kind([]) == "none"
    with pytest.raises(ValueError, match="expected a tracker"):
        kind("neptune")


def test_an_active_run_is_logged_into_and_left_open(env):
    mlflow = pytest.importorskip("mlflow")
    out = env / "run"
    with mlflow.start_run() as run:
        make_trainer().fit(make_dataset(8), output_dir=out, report_to="mlflow", **FIT)
        assert mlflow.active_run().info.run_id == run.info.run_id
    (logged,) = mlflow_runs()
    assert logged.info.run_id == run.info.run_id
    assert mlflow_history(logged) == expected_scalars(out)
