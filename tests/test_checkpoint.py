"""Checkpoints of DPO.fit: bit-identical resume after a kill, atomic writes, rotation, contents."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlox
from rlox import DPO, PreferenceDataset
from rlox.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from rlox.models import TinyCausalLM, TinyLMConfig

TESTS = Path(__file__).resolve().parent
VOCAB = 32
TOTAL_STEPS = 9  # 24 pairs, batches of 4, 2 per step: 3 steps per epoch, 3 epochs


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(n: int, seed: int) -> PreferenceDataset:
    rng = random.Random(seed)

    def row(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return PreferenceDataset.from_lists(
        [row(2, 6) for _ in range(n)], [row(1, 5) for _ in range(n)], [row(1, 5) for _ in range(n)]
    )


def build_trainer() -> DPO:
    """A seeded tiny policy with dropout (so the generator state matters) and a BCO term."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = TinyLMConfig(
        vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, dropout=0.1
    )
    model = TinyCausalLM(config)
    ref = TinyCausalLM(config)
    ref.load_state_dict(model.state_dict())
    return DPO(
        model,
        ref,
        beta=0.5,
        learning_rate=5e-3,
        loss_type=["sigmoid", "bco_pair"],
        bco_running_mean=True,
    )


def run_training(output_dir: str, *, kill_at: int | None = None, **overrides) -> tuple:
    """The run under test; ``kill_at``: SIGKILL this process right after that optimizer step."""
    trainer = build_trainer()

    def callback(step: int, metrics: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    kwargs = dict(
        epochs=3,
        batch_size=4,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        warmup_steps=2,
        weight_decay=0.01,
        log_every=1,
        eval_every=3,
        save_every=2,
        save_total_limit=3,
        output_dir=output_dir,
        progress=False,
        callback=callback,
    )
    kwargs.update(overrides)
    result = trainer.fit(make_dataset(24, 0), make_dataset(6, 1), **kwargs)
    return trainer, result


def run_in_subprocess(code: str) -> subprocess.CompletedProcess:
    script = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_checkpoint as t; {code}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )


def state_of(trainer: DPO) -> tuple[dict, dict]:
    opt = trainer.optimizer.state_dict()
    return trainer.model.state_dict(), opt


def assert_identical(a: DPO, b: DPO) -> None:
    (ma, oa), (mb, ob) = state_of(a), state_of(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa["param_groups"] == ob["param_groups"]
    for i, sa in oa["state"].items():
        for name, value in sa.items():
            assert torch.equal(value, ob["state"][i][name]), (i, name)
    assert (a.global_step, a.skipped_steps) == (b.global_step, b.skipped_steps)
    assert (a.bco_reward_sum, a.bco_reward_count) == (b.bco_reward_sum, b.bco_reward_count)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer, result = run_training(str(out))
    assert result.steps == TOTAL_STEPS
    return trainer


def test_resume_after_kill_is_bit_identical(tmp_path, uninterrupted):
    proc = run_in_subprocess(f"t.run_training({str(tmp_path)!r}, kill_at=5)")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-4"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"train"' in x] == [1, 2, 3, 4, 5]
    meta = json.loads((tmp_path / "checkpoints/step-4/checkpoint.json").read_text())
    assert meta["position"] == {"step": 4, "epoch": 1, "batch": 2}  # mid-epoch

    trainer, result = run_training(str(tmp_path), resume_from="latest")
    assert result.steps == TOTAL_STEPS and result.epochs == 3.0
    assert trainer.model.training
    assert_identical(trainer, uninterrupted)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 10))
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6, 9]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-6", "step-8", "step-9"]


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, uninterrupted):
    crash = (
        "import os, signal, rlox.checkpoint as c; real = os.rename\n"
        "def rename(a, b):\n"
        "    if str(b).endswith('step-4'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(a, b)\n"
        "c.os.rename = rename\n"
        f"t.run_training({str(tmp_path)!r})"
    )
    proc = run_in_subprocess(f"exec({crash!r})")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step-4-")]
    assert len(partial) == 1 and (partial[0] / "checkpoint.json").is_file()
    assert latest_checkpoint(tmp_path) == root / "step-2"
    trainer, result = run_training(str(tmp_path), resume_from="latest")
    assert not partial[0].exists()  # cleaned up by the next run
    assert result.steps == TOTAL_STEPS
    assert_identical(trainer, uninterrupted)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    trainer = build_trainer()
    ds = make_dataset(12, 0)
    opts = dict(batch_size=2, save_every=1, output_dir=tmp_path, progress=False, log_every=None)
    trainer.fit(ds, max_steps=3, **opts)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1", "step-2", "step-3"]
    # a newer step directory without its completion marker, and a temporary directory
    (root / "step-7").mkdir()
    (root / "step-7" / "model.safetensors").write_bytes(b"partial")
    (root / ".tmp-step-9-deadbeef").mkdir()
    (root / ".tmp-step-9-deadbeef" / "checkpoint.json").write_text("{}")
    (root / ".tmp-step-9-deadbeef" / "manifest.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-7: not a complete"):
        assert latest_checkpoint(tmp_path) == root / "step-3"
    with pytest.raises(ValueError, match="not a complete rlox checkpoint"):
        trainer.fit(ds, max_steps=8, resume_from=root / "step-7", **opts)
    resumed = build_trainer()
    with (
        pytest.warns(UserWarning, match="max_steps"),
        pytest.warns(UserWarning, match=r"step-7: not a complete"),
    ):
        result = resumed.fit(ds, max_steps=4, resume_from="latest", **opts)
    assert result.steps == 4 and resumed.global_step == 4
    assert not (root / ".tmp-step-9-deadbeef").exists()
    assert not (root / "step-7").exists()  # a later step directory: removed by the new step 4
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3", "step-4"]


def test_latest_with_no_checkpoint_starts_fresh(tmp_path):
    trainer = build_trainer()
    result = trainer.fit(
        make_dataset(8, 0),
        batch_size=4,
        output_dir=tmp_path,
        resume_from="latest",
        progress=False,
        log_every=None,
    )
    assert result.steps == 2 and result.checkpoint == tmp_path / "checkpoints" / "step-2"


def test_rotation_keeps_the_newest(tmp_path):
    trainer = build_trainer()
    trainer.fit(
        make_dataset(10, 0),
        batch_size=2,
        save_every=1,
        save_total_limit=2,
        output_dir=tmp_path,
        progress=False,
        log_every=None,
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-5"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resuming_an_older_checkpoint_supersedes_the_later_ones(tmp_path):
    kw = dict(batch_size=2, save_every=1, output_dir=tmp_path, progress=False, log_every=None)
    build_trainer().fit(make_dataset(10, 0), save_total_limit=10, **kw)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-{k}" for k in range(1, 6)]
    # branch off step 2 with a limit of 2: step 3 of the new run replaces steps 3..5 of the old
    # one, and rotation keeps the resumed-from checkpoint and the new one
    resumed = build_trainer()
    with pytest.warns(UserWarning, match="max_steps differ"):
        resumed.fit(
            make_dataset(10, 0),
            resume_from=tmp_path / "checkpoints" / "step-2",
            save_total_limit=2,
            max_steps=3,
            **kw,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-3"


def test_checkpoint_contents_and_loading_runs_no_pickle(tmp_path, monkeypatch):
    trainer = build_trainer()
    result = trainer.fit(
        make_dataset(8, 0), batch_size=4, output_dir=tmp_path, progress=False, log_every=None
    )
    path = result.checkpoint
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json",
        "manifest.json",
        "model.safetensors",
        "optimizer.pt",
        "rng.safetensors",
    ]
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["optimizer"] == "Adam"
    assert meta["optimizer_groups"][0]["params"] == [n for n, _ in trainer.model.named_parameters()]
    assert meta["rlox_version"] == rlox.__version__ and meta["step"] == 2
    assert meta["position"] == {"step": 2, "epoch": 1, "batch": 0}
    assert meta["fit"]["batch_size"] == 4 and meta["fit"]["seed"] == 0
    assert meta["config"]["loss_type"] == ["sigmoid", "bco_pair"]
    assert meta["bco"]["count"] == trainer.bco_reward_count == 16
    assert meta["counters"]["global_step"] == 2
    assert meta["scheduler"]["last_epoch"] == 2
    assert set(meta["rng"]) == {"python", "numpy"}

    real_load = torch.load
    calls = []

    def strict_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", strict_load)
    other = build_trainer()
    state = random.getstate()
    loaded = load_checkpoint(path, model=other.model, optimizer=other.optimizer, rng=False)
    assert random.getstate() == state and calls
    assert loaded["step"] == 2
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, other.model.state_dict()[k]), k


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = build_trainer()
    state = {"note": "first"}
    first = save_checkpoint(
        tmp_path, 1, model=trainer.model, optimizer=trainer.optimizer, state=state
    )

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, model=trainer.model, optimizer=trainer.optimizer, state={})
    assert list_checkpoints(tmp_path) == [first]
    assert json.loads((first / "checkpoint.json").read_text())["note"] == "first"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]


def test_resume_needs_the_same_data_order(tmp_path):
    trainer = build_trainer()
    ds = make_dataset(8, 0)
    trainer.fit(ds, batch_size=2, max_steps=2, output_dir=tmp_path, progress=False)
    other = build_trainer()
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"^resume_from: .* batch_size=2, this call has batch_size=4"
    ):
        other.fit(ds, batch_size=4, output_dir=tmp_path, resume_from="latest", progress=False)
    for k, v in other.model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"^resume_from: .* seed=0, this call has seed=1"):
        build_trainer().fit(
            ds, batch_size=2, seed=1, output_dir=tmp_path, resume_from="latest", progress=False
        )
