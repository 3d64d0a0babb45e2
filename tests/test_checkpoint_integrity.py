"""Checkpoint manifests and optimizer groups.

A damaged newest checkpoint is skipped on resume (with a warning) and refused when named; a save
killed at any point never exposes a partial checkpoint; loading raises ``ValueError`` naming the
file, never a library's own error; ``DPO.load`` rebuilds the saved optimizer, groups and all.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from test_checkpoint import assert_identical, build_trainer, make_dataset, run_training

from rlox import DPO
from rlox.checkpoint import (
    FILES,
    MANIFEST,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from rlox.models import TinyCausalLM, TinyLMConfig

TRAINER_FILES = ("trainer.json", "model.safetensors", "optimizer.pt")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncate": truncate, "flip": flip}
# How verification names a damaged file: truncated, changed, or (the manifest) unusable.
DAMAGED = r" (has \d+ bytes|does not match its crc32|is unreadable|is damaged)"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run (checkpoints at steps 6, 8 and 9) and its output directory."""
    out = tmp_path_factory.mktemp("baseline")
    trainer, result = run_training(str(out))
    assert [p.name for p in list_checkpoints(out)] == ["step-6", "step-8", "step-9"]
    return trainer, out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", [*FILES, MANIFEST])
def test_latest_skips_a_damaged_newest_checkpoint(tmp_path, baseline, name, damage):
    uninterrupted, out = baseline
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / "step-9"
    DAMAGE[damage](newest / name)
    steps = []
    pattern = f"skipping checkpoint {re.escape(str(newest))}: {re.escape(name)}{DAMAGED}"
    with pytest.warns(UserWarning, match=pattern):
        trainer, result = run_training(
            str(tmp_path), resume_from="latest", callback=lambda step, m: steps.append(step)
        )
    assert steps == [9]  # resumed after step 8, not from scratch
    assert result.steps == 9
    assert_identical(trainer, uninterrupted)
    verify_checkpoint(newest)  # rewritten whole


def test_latest_skips_checkpoints_without_a_manifest(tmp_path, baseline):
    """Checkpoints written before manifests existed cannot be verified: skipped, with a reason."""
    uninterrupted, out = baseline
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "checkpoints"
    (root / "step-9" / MANIFEST).unlink()
    assert list_checkpoints(tmp_path) == [root / "step-6", root / "step-8"]
    with pytest.warns(UserWarning, match=r"step-9: not a complete .*before rlox checkpoints had"):
        assert latest_checkpoint(tmp_path) == root / "step-8"
    with pytest.warns(UserWarning, match="step-9"):
        trainer, _ = run_training(str(tmp_path), resume_from="latest")
    assert_identical(trainer, uninterrupted)


def small_checkpoint(tmp_path: Path) -> tuple[DPO, Path]:
    trainer = build_trainer()
    trainer.train_step([[3, 4], [5, 6]], [[6, 7], [7, 8]], [[9, 10], [11, 12]])
    path = save_checkpoint(
        tmp_path, 1, model=trainer.model, optimizer=trainer.optimizer, state={"note": 1}
    )
    return trainer, path


@pytest.mark.parametrize("name", FILES)
def test_an_explicit_damaged_checkpoint_raises_naming_it(tmp_path, name):
    _, path = small_checkpoint(tmp_path)
    truncate(path / name)
    named = rf"^resume_from: {re.escape(str(path))}: {re.escape(name)} has \d+ bytes"
    other = build_trainer()
    with pytest.raises(ValueError, match=named):
        other.fit(make_dataset(8, 0), batch_size=4, resume_from=path, progress=False)
    with pytest.raises(ValueError, match=named):
        load_checkpoint(path, model=other.model, optimizer=other.optimizer)
    # Read unverified, the library's error comes wrapped, naming the file, with it as the cause.
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: cannot load {name}") as info:
        load_checkpoint(path, model=other.model, optimizer=other.optimizer, verify=False)
    assert info.value.__cause__ is not None


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path):
    trainer, path = small_checkpoint(tmp_path)
    flip(path / "model.safetensors")  # inside the tensor data: safetensors itself loads it
    other = build_trainer()
    load_checkpoint(path, model=other.model, rng=False, verify=False)
    changed = [
        k for k, v in other.model.state_dict().items() if not v.equal(trainer.model.state_dict()[k])
    ]
    assert len(changed) == 1  # one tensor silently changed: what an unverified resume trains on
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its crc32"):
        verify_checkpoint(path)


def test_manifest_records_size_and_crc32(tmp_path):
    saved = saved_trainer(tmp_path / "trainer")
    _, path = small_checkpoint(tmp_path)
    for directory, files in [(saved, TRAINER_FILES), (path, FILES)]:
        manifest = json.loads((directory / MANIFEST).read_text())
        assert manifest["algorithm"] == "crc32"
        assert sorted(manifest["files"]) == sorted(files)
        for name, entry in manifest["files"].items():
            data = (directory / name).read_bytes()
            assert entry == {"size": len(data), "crc32": zlib.crc32(data)}, name
    # An edit that keeps the manifest valid JSON is caught by its own checksum.
    manifest["files"]["optimizer.pt"]["size"] += 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json is damaged"):
        verify_checkpoint(path)


# Imports torch once, then per "go <step>" line forks a child that saves checkpoints from that
# step on in a loop (printing "ready" after its first), and per "kill" line SIGKILLs it.
SAVER = r"""
import os, signal, sys
import torch
from torch import nn
from rlox.checkpoint import save_checkpoint

torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
optimizer = torch.optim.Adam(model.parameters())
model(torch.ones(1, 256)).sum().backward()
optimizer.step()
print("up", flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "kill":
        os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
        print("dead" if os.WIFSIGNALED(status) else "survived", flush=True)
        continue
    child = os.fork()
    if child == 0:
        try:
            step = first = int(args[0])
            while True:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(step)
                save_checkpoint(sys.argv[1], step, model=model, optimizer=optimizer,
                                state={"value": step}, keep=2)
                if step == first:
                    print("ready", flush=True)
                step += 1
        finally:
            os._exit(1)
"""


def test_sigkill_during_saves_never_exposes_a_partial_checkpoint(tmp_path):
    rng = random.Random(0)
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    root = tmp_path / "checkpoints"
    try:
        assert proc.stdout.readline() == "up\n"
        start, killed_mid_write = 1, 0
        for _ in range(6):
            proc.stdin.write(f"go {start}\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.1))
            proc.stdin.write("kill\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "dead\n"
            killed_mid_write += any(p.name.startswith(".tmp-") for p in root.iterdir())
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing to skip: no step directory is partial
                found = latest_checkpoint(tmp_path)
            listed = list_checkpoints(tmp_path)
            assert found is not None and found == listed[-1]
            assert all(p.name.startswith("step-") for p in listed)
            for path in listed:
                verify_checkpoint(path)
            model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
            optimizer = torch.optim.Adam(model.parameters())
            meta = load_checkpoint(found, model=model, optimizer=optimizer, rng=False)
            assert meta["value"] == meta["step"] == int(found.name.split("-")[1]) >= start
            assert all(bool((p == meta["value"]).all()) for p in model.parameters())
            assert len(optimizer.state) == 4
            start = meta["step"] + 1
    finally:
        proc.kill()
        proc.wait()
    assert killed_mid_write  # some kill did land inside a save


# ---------------------------------------------------------------------------- optimizer groups
def frozen_model(seed: int) -> TinyCausalLM:
    """A tiny policy whose position embedding is frozen."""
    torch.manual_seed(seed)
    config = TinyLMConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    model = TinyCausalLM(config)
    model.pos_emb.weight.requires_grad_(False)
    return model


def group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


BATCH = ([[3, 4, 5], [6, 7, 8]], [[1, 2], [3, 4]], [[7, 8], [9, 10]])


def test_load_rebuilds_the_saved_optimizer_groups(tmp_path):
    """AdamW in two groups, then Adam over the trainable parameters: load gets the same."""
    model = frozen_model(0)
    trainer = DPO(model, copy.deepcopy(model), learning_rate=1e-2)
    kw = dict(batch_size=4, progress=False, log_every=None)
    trainer.fit(make_dataset(8, 0), weight_decay=0.1, **kw)
    trainer.fit(make_dataset(8, 1), weight_decay=0.0, **kw)
    names = group_names(model, trainer.optimizer)
    assert type(trainer.optimizer) is torch.optim.Adam and len(names) == 1
    assert "pos_emb.weight" not in names[0] and len(names[0]) == 15
    trainer.save(tmp_path)

    fresh = frozen_model(5)
    loaded = DPO.load(tmp_path, fresh, copy.deepcopy(trainer.ref_model))
    assert type(loaded.optimizer) is torch.optim.Adam
    assert group_names(fresh, loaded.optimizer) == names
    a, b = trainer.optimizer.state_dict(), loaded.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][i][key]), (i, key)
    torch.manual_seed(7)
    step = trainer.train_step(*BATCH)
    torch.manual_seed(7)
    assert loaded.train_step(*BATCH) == step
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_load_rejects_an_optimizer_of_other_groups(tmp_path):
    model = frozen_model(0)
    trainer = DPO(model, copy.deepcopy(model), learning_rate=1e-2)
    trainer.fit(make_dataset(8, 0), batch_size=4, weight_decay=0.1, progress=False, log_every=None)
    trainer.save(tmp_path)
    fresh = frozen_model(5)
    ref = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"^optimizer: the checkpoint used AdamW, this .* Adam$"):
        DPO.load(tmp_path, fresh, ref, optimizer=torch.optim.Adam(fresh.parameters()))
    with pytest.raises(ValueError, match=r"^optimizer: the checkpoint has 2 parameter groups"):
        DPO.load(tmp_path, fresh, ref, optimizer=torch.optim.AdamW(fresh.parameters()))
    # Two groups of the saved sizes, but the frozen embedding in place of the token embedding.
    saved = group_names(model, trainer.optimizer)
    params = dict(fresh.named_parameters())
    swapped = [["pos_emb.weight" if n == "tok_emb.weight" else n for n in g] for g in saved]
    groups = [{"params": [params[n] for n in g]} for g in swapped]
    with pytest.raises(
        ValueError,
        match=r"^optimizer: the checkpoint's group 0 has 5 parameters, this optimizer's has 5 "
        r"\(only the checkpoint's: 'tok_emb.weight'; only this optimizer's: 'pos_emb.weight'\)",
    ):
        DPO.load(tmp_path, fresh, ref, optimizer=torch.optim.AdamW(groups))


def test_resume_with_other_optimizer_groups_names_the_difference(tmp_path):
    """The run's optimizer covers the trainable parameters; a fresh trainer's Adam covers all."""
    model = frozen_model(0)
    trainer = DPO(model, copy.deepcopy(model), learning_rate=1e-2)
    kw = dict(batch_size=4, progress=False, log_every=None)
    trainer.fit(make_dataset(8, 0), weight_decay=0.1, **kw)
    trainer.fit(make_dataset(8, 0), weight_decay=0.0, output_dir=tmp_path, **kw)
    fresh = frozen_model(5)
    other = DPO(fresh, copy.deepcopy(model), learning_rate=1e-2)
    with pytest.raises(
        ValueError,
        match=r"^optimizer: the checkpoint's group 0 has 15 parameters, this optimizer's has 16 "
        r"\(only this optimizer's: 'pos_emb.weight'\)",
    ):
        other.fit(make_dataset(8, 0), resume_from=latest_checkpoint(tmp_path), **kw)


# ---------------------------------------------------------------------------- DPO.save / load
def saved_trainer(tmp_path: Path) -> Path:
    model = frozen_model(0)
    trainer = DPO(model, copy.deepcopy(model), learning_rate=1e-2)
    trainer.train_step(*BATCH)
    trainer.save(tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", [*TRAINER_FILES, MANIFEST])
def test_dpo_load_of_a_damaged_save_raises_naming_the_file(tmp_path, name, damage):
    path = saved_trainer(tmp_path)
    DAMAGE[damage](path / name)
    fresh = frozen_model(5)
    with pytest.raises(
        ValueError, match=f"^path: {re.escape(str(path))}: {re.escape(name)}{DAMAGED}"
    ):
        DPO.load(path, fresh, copy.deepcopy(fresh))


def test_dpo_load_without_a_manifest(tmp_path):
    """A save from before manifests loads, unverified; a damaged one raises ValueError anyway."""
    path = saved_trainer(tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"manifest\.json missing \(the save was interrupted\)"):
        DPO.load(path, frozen_model(5), frozen_model(5))
    meta = json.loads((path / "trainer.json").read_text())
    for key in ("manifest", "optimizer_groups"):  # as an older rlox wrote it
        del meta[key]
    (path / "trainer.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="loading it unverified"):
        loaded = DPO.load(path, frozen_model(5), frozen_model(5))
    assert loaded.global_step == 1
    truncate(path / "model.safetensors")
    with (
        pytest.warns(UserWarning, match="unverified"),
        pytest.raises(
            ValueError, match=r"cannot load model\.safetensors \(SafetensorError"
        ) as info,
    ):
        DPO.load(path, frozen_model(5), frozen_model(5))
    assert type(info.value.__cause__).__name__ == "SafetensorError"
