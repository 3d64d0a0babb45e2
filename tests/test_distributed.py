"""DPO under torch.distributed: 2-process DDP and FSDP2 runs on CPU (gloo) via torchrun.

The tests launch ``python -m torch.distributed.run --nproc_per_node=2`` on this same file; its
``__main__`` block is the worker, which runs the named ``JOBS`` in turn. For each job every rank
saves its final weights and per-step metrics to ``<root>/results/<job>-rank<r>.pt`` for the tests
to compare with a single-process run. Two launches in all: the first runs every uninterrupted and
interrupted job, the second resumes the interrupted ones.

The single-process reference trains on the union of the ranks' batches: round ``k`` of a
``world_size=2`` plan gives rank 0 ``plan_0[k]`` and rank 1 ``plan_1[k]``, so the global batch of
optimizer step ``k`` is ``plan_0[k] + plan_1[k]``, collated as one batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlox import DPO, PreferenceDataset
from rlox.algorithms.dpo import schedule_factor
from rlox.checkpoint import full_state, latest_checkpoint, load_checkpoint
from rlox.models import TinyCausalLM, TinyLMConfig

VOCAB = 32
PAIRS = 24
WORLD = 2
TRAINER_KW: dict[str, Any] = {"beta": 0.5, "learning_rate": 1e-3}
# What fixes the data order; fit gets the same values.
DATA_KW: dict[str, Any] = {"layout": "padded", "max_length": 24}
FIT_KW: dict[str, Any] = {
    **DATA_KW,
    "epochs": 2,
    "batch_size": 3,
    "seed": 5,
    "lr_scheduler": "linear",
    "warmup_steps": 2,
}
STEPS = 8  # 24 pairs / (3 pairs x 2 ranks) = 4 rounds per epoch, 2 epochs
RECORD_KEYS = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
    "grad_norm",
    "lr",
)


# ------------------------------------------------------------------------------ shared setup
def make_dataset() -> PreferenceDataset:
    """``PAIRS`` random pairs of varied lengths (so rank batches and their union pad differently)."""
    rng = random.Random(0)

    def row(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return PreferenceDataset.from_lists(
        [row(2, 8) for _ in range(PAIRS)],
        [row(1, 7) for _ in range(PAIRS)],
        [row(1, 7) for _ in range(PAIRS)],
    )


def make_models() -> tuple[TinyCausalLM, TinyCausalLM]:
    """(policy, reference): the policy is the reference plus noise, so rewards start non-zero."""
    torch.manual_seed(0)
    # max_seq_len > VOCAB: the position embedding is the largest embedding of the model.
    config = TinyLMConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=40)
    ref = TinyCausalLM(config)
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    # The key bias shifts every attention score of a query alike, so softmax cancels it: its true
    # gradient is 0 and Adam would turn rounding noise (which differs between a 2-rank and a
    # 1-rank run) into lr-sized steps. Freezing the qkv biases keeps the comparison meaningful.
    for block in policy.blocks:
        block.attn.qkv.bias.requires_grad_(False)
    return policy, ref


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each block, then the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached full copies of the weights (sharded DTensors are gathered: a collective)."""
    out = {}
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.detach().clone()
    return out


# ------------------------------------------------------------------------------ worker
# Runs the worker can do; several may share one torchrun launch (one process group).
JOBS: dict[str, dict[str, Any]] = {
    # Uninterrupted; each rank is given its own output_dir, so rank 1 writing would show.
    "full": {"mode": "ddp", "output_dir": "out-{rank}", "save_every": 3},
    # Stops after step 5 as a crash would (the last checkpoint is step 3) ...
    "interrupted": {"mode": "ddp", "output_dir": "shared", "save_every": 3, "stop_after": 5},
    # ... and a second launch resumes it.
    "resumed": {"mode": "ddp", "output_dir": "shared", "save_every": 3, "resume": True},
    # FSDP2 likewise: uninterrupted (then DPO.save / DPO.load), interrupted, resumed.
    "fsdp": {"mode": "fsdp", "output_dir": "fsdp-{rank}", "save_every": 3, "reload": True},
    "fsdp_interrupted": {
        "mode": "fsdp",
        "output_dir": "fsdp-shared",
        "save_every": 3,
        "stop_after": 5,
    },
    "fsdp_resumed": {"mode": "fsdp", "output_dir": "fsdp-shared", "save_every": 3, "resume": True},
    # precompute_reference with a sharded reference, on the store at <root>/store.
    "fsdp_reference": {"mode": "reference"},
    # Truncation empties one rank's micro-batch in some rounds (see make_emptied_dataset).
    "emptied": {"mode": "emptied", "wrap": "ddp"},
    "fsdp_emptied": {"mode": "emptied", "wrap": "fsdp"},
    # TR-DPO: the reference moves toward the policy every 3 steps, alike on every rank.
    "sync": {"mode": "ddp", "trainer_kw": "sync"},
    "fsdp_sync": {"mode": "fsdp", "trainer_kw": "sync"},
    "fsdp_sync_sharded": {"mode": "fsdp", "trainer_kw": "sync", "shard_ref": True},
    # Gradient accumulation: FSDP2 reduce-scatters on the last micro-batch of a step only, or
    # (forced, for comparison) on every micro-batch.
    "fsdp_accumulate": {"mode": "accumulate", "sync_every": False},
    "fsdp_accumulate_sync_every": {"mode": "accumulate", "sync_every": True},
}
SYNC_KW: dict[str, Any] = {
    "sync_ref_model": True,
    "ref_model_sync_steps": 3,
    "ref_model_mixup_alpha": 0.5,
}
# Pairs 1, 6 and 11 have 30-token prompts, which max_length 24 drops. The plan puts pairs 1 and
# 11 in one micro-batch of rank 1 (rounds 0/1 and 1/2 of the epochs) while rank 0's keeps a pair;
# with 2 micro-batches per step that empty batch is the last of a step in epoch 0 and the first
# in epoch 1.
EMPTIED_DATA_KW: dict[str, Any] = {"layout": "padded", "max_length": 24}
EMPTIED_PLAN_KW: dict[str, Any] = {**EMPTIED_DATA_KW, "batch_size": 2, "seed": 5}
EMPTIED_FIT_KW: dict[str, Any] = {**EMPTIED_PLAN_KW, "epochs": 2, "gradient_accumulation_steps": 2}
EMPTIED_STEP = ([3, 4], [1, 11])  # a train_step whose rank-1 batch is emptied
PRECOMPUTE_KW: dict[str, Any] = {**DATA_KW, "batch_size": 4, "progress": False}
# 24 pairs / (2 pairs x 2 ranks) = 6 rounds per epoch: 2 optimizer steps of 3 micro-batches.
ACCUMULATE_PLAN_KW: dict[str, Any] = {**DATA_KW, "batch_size": 2, "seed": 5}
ACCUMULATE_FIT_KW: dict[str, Any] = {
    **ACCUMULATE_PLAN_KW,
    "epochs": 2,
    "gradient_accumulation_steps": 3,
}
ACCUMULATE_STEPS = 4
FSDP_GROUPS = 3  # shard(): each of the 2 blocks, then the root


class _Interrupted(Exception):
    """Raised from the fit callback to stop a run mid-way."""


def reload(root: Path, trainer: DPO) -> dict[str, Any]:
    """DPO.save a sharded trainer, load it (and the DDP run's last checkpoint) into fresh ones."""
    policy = trainer.model
    saved = root / "fsdp-saved"
    trainer.save(saved)
    fresh, ref = make_models()
    loaded = DPO.load(saved, shard(fresh), ref)
    other, _ = make_models()
    other = shard(other)
    other_opt = torch.optim.Adam(other.parameters())
    ddp_checkpoint = latest_checkpoint(root / "out-0")
    load_checkpoint(ddp_checkpoint, model=other, optimizer=other_opt, rng=False)
    return {
        "optim": full_state(policy, trainer.optimizer)[1],
        "reload_params": full_params(fresh),
        "reload_optim": full_state(fresh, loaded.optimizer)[1],
        "reload_global_step": loaded.global_step,
        "ddp_load_params": full_params(other),
        "ddp_load_optim": full_state(other, other_opt)[1],
    }


def precompute_job(root: Path) -> dict[str, Any]:
    """Reference log-probs of the store at ``root/store`` with a sharded reference."""
    policy, ref = make_models()
    trainer = DPO(policy, shard(ref), **TRAINER_KW)
    cached = trainer.precompute_reference(PreferenceDataset.load(root / "store"), **PRECOMPUTE_KW)
    return {
        "chosen": torch.from_numpy(cached.chosen),
        "rejected": torch.from_numpy(cached.rejected),
        "key": json.dumps(cached.key, sort_keys=True),
        "path": str(cached.path),
    }


def make_emptied_dataset() -> PreferenceDataset:
    rng = random.Random(0)

    def row(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    prompts = [row(2, 8) for _ in range(16)]
    for i in (1, 6, 11):
        prompts[i] = row(30, 30)
    return PreferenceDataset.from_lists(
        prompts, [row(1, 7) for _ in range(16)], [row(1, 7) for _ in range(16)]
    )


def emptied_job(wrap: str, rank: int) -> dict[str, Any]:
    """fit (with evaluation) then one train_step, on data where one rank's batches empty."""
    policy, ref = make_models()
    if wrap == "ddp":
        model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(policy)
    else:
        model = shard(policy)
    syncs: list[bool] = []
    if wrap == "fsdp":
        # Record FSDP2's gradient-sync switches: off for all but the last micro-batch of a step.
        toggle = model.set_requires_gradient_sync
        model.set_requires_gradient_sync = lambda on, **kw: syncs.append(on) or toggle(on, **kw)
    trainer = DPO(model, ref, **TRAINER_KW)
    ds = make_emptied_dataset()
    seen: list[dict[str, float]] = []
    result = trainer.fit(
        ds,
        ds,
        progress=False,
        log_every=None,
        callback=lambda step, m: seen.append(m),
        **EMPTIED_FIT_KW,
    )
    fit_params = full_params(policy)
    batch = ds.collate(EMPTIED_STEP[rank], pad_token_id=0, vocab_size=VOCAB, **EMPTIED_DATA_KW)
    step = trainer.train_step(batch)
    return {
        "fit_params": fit_params,
        "metrics": seen,
        "eval": result.eval,
        "step": step,
        "step_params": full_params(policy),
        "batch_pairs": batch.num_pairs,
        "gradient_syncs": syncs,
    }


def union_steps(
    trainer: DPO,
    ds: PreferenceDataset,
    fit_kw: dict[str, Any],
    plan_kw: dict[str, Any],
    data_kw: dict[str, Any],
) -> list[dict[str, float]]:
    """One train_step per optimizer step of a WORLD-rank fit: the union of every rank's
    micro-batches of that step, in the ranks' plan order."""
    gas = fit_kw["gradient_accumulation_steps"]
    metrics = []
    for epoch in range(fit_kw["epochs"]):
        plans = [ds.batches(epoch=epoch, rank=r, world_size=WORLD, **plan_kw) for r in range(WORLD)]
        for k in range(0, len(plans[0]), gas):
            union = np.concatenate([p[j] for j in range(k, k + gas) for p in plans])
            batch = ds.collate(union, pad_token_id=0, vocab_size=VOCAB, **data_kw)
            metrics.append(trainer.train_step(batch))
    return metrics


def emptied_reference() -> dict[str, Any]:
    """One process on the union of both ranks' micro-batches of each step."""
    ds = make_emptied_dataset()
    policy, ref = make_models()
    trainer = DPO(policy, ref, **TRAINER_KW)
    metrics = union_steps(trainer, ds, EMPTIED_FIT_KW, EMPTIED_PLAN_KW, EMPTIED_DATA_KW)
    fit_params = full_params(policy)
    eval_metrics = trainer.evaluate(ds, batch_size=2, **EMPTIED_DATA_KW)
    union = np.concatenate(EMPTIED_STEP)
    step = trainer.train_step(
        ds.collate(union, pad_token_id=0, vocab_size=VOCAB, **EMPTIED_DATA_KW)
    )
    return {
        "fit_params": fit_params,
        "metrics": metrics,
        "eval": eval_metrics,
        "step": step,
        "step_params": full_params(policy),
    }


def accumulate_job(sync_every: bool) -> dict[str, Any]:
    """fit with 3 micro-batches per step under FSDP2, counting reduce-scatters; ``sync_every``
    forces a gradient sync on every micro-batch."""
    import contextlib

    import torch.distributed as dist

    import rlox.train.loop

    policy, ref = make_models()
    trainer = DPO(shard(policy), ref, **TRAINER_KW)
    calls = [0]
    reduce_scatter = dist.reduce_scatter_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counted
    sync = rlox.train.loop.gradient_sync
    if sync_every:
        rlox.train.loop.gradient_sync = lambda model, sync: contextlib.nullcontext()
    try:
        seen: list[dict[str, float]] = []
        trainer.fit(
            make_dataset(),
            progress=False,
            log_every=None,
            callback=lambda step, m: seen.append(m),
            **ACCUMULATE_FIT_KW,
        )
    finally:
        dist.reduce_scatter_single = reduce_scatter
        rlox.train.loop.gradient_sync = sync
    return {"params": full_params(policy), "metrics": seen, "reduce_scatters": calls[0]}


def accumulate_reference() -> dict[str, Any]:
    """One process, one batch per step: the union of both ranks' 3 micro-batches."""
    ds = make_dataset()
    policy, ref = make_models()
    trainer = DPO(policy, ref, **TRAINER_KW)
    metrics = union_steps(trainer, ds, ACCUMULATE_FIT_KW, ACCUMULATE_PLAN_KW, DATA_KW)
    return {"params": full_params(policy), "metrics": metrics}


def run_job(root: Path, name: str, rank: int, world: int) -> None:
    job = JOBS[name]
    if job["mode"] == "reference":
        torch.save(precompute_job(root), root / "results" / f"{name}-rank{rank}.pt")
        return
    if job["mode"] == "emptied":
        torch.save(emptied_job(job["wrap"], rank), root / "results" / f"{name}-rank{rank}.pt")
        return
    if job["mode"] == "accumulate":
        torch.save(accumulate_job(job["sync_every"]), root / "results" / f"{name}-rank{rank}.pt")
        return
    policy, ref = make_models()
    if job["mode"] == "ddp":
        model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(policy)
    else:
        model = shard(policy)
    if job.get("shard_ref"):
        ref = shard(ref)
    extra = SYNC_KW if job.get("trainer_kw") == "sync" else {}
    trainer = DPO(model, ref, **TRAINER_KW, **extra)
    trainer.check_layout(FIT_KW.get("layout", "padded"))  # the route probe runs full forwards
    head_inputs: set[int] = set()
    policy.lm_head.register_forward_hook(lambda m, args, out: head_inputs.add(args[0].dim()))
    seen: list[dict[str, float]] = []

    def callback(step: int, metrics: dict[str, float]) -> None:
        seen.append(dict(metrics, step=step))
        if step == job.get("stop_after"):
            raise _Interrupted

    out_dir = job.get("output_dir")
    steps = None
    try:
        result = trainer.fit(
            make_dataset(),
            output_dir=None if out_dir is None else root / out_dir.format(rank=rank),
            save_every=job.get("save_every"),
            resume_from="latest" if job.get("resume") else None,
            max_steps=job.get("max_steps"),
            log_every=1,
            progress=False,
            callback=callback,
            **FIT_KW,
        )
        steps = result.steps
    except _Interrupted:
        pass
    state = {
        "params": full_params(policy),
        "ref_params": full_params(ref),
        "metrics": seen,
        "steps": steps,
        "global_step": trainer.global_step,
        "world_size": world,
        "vocab_size": trainer.vocab_size,
        "head_input_dims": sorted(head_inputs),
    }
    if job.get("reload"):
        state.update(reload(root, trainer))
    torch.save(state, root / "results" / f"{name}-rank{rank}.pt")


def worker(argv: list[str]) -> None:
    """``test_distributed.py ROOT JOB...``, launched by torchrun."""
    import torch.distributed as dist

    root, names = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name in names:
            run_job(root, name, dist.get_rank(), dist.get_world_size())
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ test helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: Path, *jobs: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``jobs`` one after another in one launch of WORLD processes; return each rank's state."""
    (root / "results").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        __file__,
        str(root),
        *jobs,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {
        job: [
            torch.load(root / "results" / f"{job}-rank{r}.pt", weights_only=True)
            for r in range(WORLD)
        ]
        for job in jobs
    }


def reference_run(max_steps: int | None = None, **trainer_kw: Any) -> dict[str, Any]:
    """One process, one batch per step: the union of the ranks' batches of that round."""
    ds = make_dataset()
    policy, ref = make_models()
    trainer = DPO(policy, ref, **TRAINER_KW, **trainer_kw)
    plan_kw = dict(DATA_KW, batch_size=FIT_KW["batch_size"], seed=FIT_KW["seed"])
    plans = [
        [ds.batches(epoch=e, rank=r, world_size=WORLD, **plan_kw) for r in range(WORLD)]
        for e in range(FIT_KW["epochs"])
    ]
    total = sum(len(p[0]) for p in plans)
    assert total == STEPS
    total = total if max_steps is None else min(total, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer,
        schedule_factor(FIT_KW["lr_scheduler"], FIT_KW["warmup_steps"], total),
    )
    metrics, unions = [], []
    for epoch_plans in plans:
        assert len({len(p) for p in epoch_plans}) == 1, "every rank gets one batch per round"
        epoch_union = []
        for k in range(len(epoch_plans[0])):
            if len(metrics) == total:
                break
            union = np.concatenate([p[k] for p in epoch_plans])
            epoch_union.append(union)
            lr = trainer.optimizer.param_groups[0]["lr"]
            batch = ds.collate(union, pad_token_id=0, vocab_size=VOCAB, **DATA_KW)
            m = trainer.train_step(batch)
            assert m["skipped"] == 0.0
            metrics.append(dict(m, lr=lr, num_pairs=float(len(union))))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler.step()
        unions.append(epoch_union)
    return {
        "params": full_params(policy),
        "ref_params": full_params(ref),
        "metrics": metrics,
        "unions": unions,
    }


def assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def assert_metrics_match(got: dict[str, Any], want: dict[str, float], step: int) -> None:
    # abs 1e-5: a margin is a small difference of rewards near 2, and the one-process run
    # computes the LM head in chunks where an FSDP2 root runs it whole (float32 rounding).
    for key in RECORD_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (step, key)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return reference_run()


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The first torchrun launch: every job but the resumed ones."""
    root = tmp_path_factory.mktemp("dist")
    make_dataset().save(root / "store")
    jobs = ("full", "interrupted", "fsdp", "fsdp_interrupted", "fsdp_reference")
    jobs += ("emptied", "fsdp_emptied", "sync", "fsdp_sync", "fsdp_sync_sharded")
    jobs += ("fsdp_accumulate", "fsdp_accumulate_sync_every")
    return root, torchrun(root, *jobs)


@pytest.fixture(scope="module")
def resumed(launch) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the interrupted runs left, by output_dir), then the second launch resuming them."""
    root = launch[0]
    left = {}
    for out in ("shared", "fsdp-shared"):
        left[out] = {
            "checkpoints": sorted(p.name for p in (root / out / "checkpoints").iterdir()),
            "steps": [r["step"] for r in read_records(root / out / "metrics.jsonl")],
        }
    return left, torchrun(root, "resumed", "fsdp_resumed")


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("job", ["sync", "fsdp_sync", "fsdp_sync_sharded"])
def test_trdpo_moves_every_ranks_reference_like_one_process(launch, job):
    """TR-DPO under DDP and FSDP2 (reference plain or sharded) equals one process's run."""
    want = reference_run(**SYNC_KW)
    policy, ref = make_models()
    initial = full_params(ref)
    assert any(not torch.equal(want["ref_params"][k], v) for k, v in initial.items())
    for r, state in enumerate(launch[1][job]):
        assert state["global_step"] == STEPS, r
        assert_params_close(state["params"], want["params"])
        assert_params_close(state["ref_params"], want["ref_params"])
        for m, w in zip(state["metrics"], want["metrics"], strict=True):
            assert_metrics_match(m, w, (r, m["step"]))


def test_union_batches_partition_each_epoch(reference):
    for epoch_union in reference["unions"]:
        seen = np.sort(np.concatenate(epoch_union))
        assert np.array_equal(seen, np.arange(PAIRS))
        assert {len(u) for u in epoch_union} == {WORLD * FIT_KW["batch_size"]}


def test_ddp_matches_one_process_on_the_global_batch(launch, reference):
    ranks = launch[1]["full"]
    policy, _ = make_models()
    initial = full_params(policy)
    for r, state in enumerate(ranks):
        assert state["world_size"] == WORLD
        assert state["steps"] == STEPS and state["global_step"] == STEPS, r
        assert_params_close(state["params"], reference["params"])
        assert any(not torch.equal(state["params"][k], initial[k]) for k in initial)
        # The DDP wrapper is looked through: the model's vocabulary (not its largest
        # embedding, the positions) and the LM head run at the gathered points only.
        assert state["vocab_size"] == VOCAB
        assert state["head_input_dims"] == [2]
    # Gradients are all-reduced before each update, so the ranks stay bit-identical.
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # The step metrics every rank sees are the all-reduced ones of the global batch.
    for r, state in enumerate(ranks):
        assert [m["step"] for m in state["metrics"]] == list(range(1, STEPS + 1))
        for m, want in zip(state["metrics"], reference["metrics"], strict=True):
            assert m["num_pairs"] == want["num_pairs"] == WORLD * FIT_KW["batch_size"]
            assert m["skipped"] == 0.0
            assert_metrics_match(m, want, (r, m["step"]))


def test_only_rank0_writes_metrics_and_checkpoints(launch, reference):
    root = launch[0]
    assert not (root / "out-1").exists(), "rank 1 must not write anything"
    out = root / "out-0"
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {r["split"] for r in records} == {"train"}
    for record, want in zip(records, reference["metrics"], strict=True):
        assert record["skipped"] == 0
        assert_metrics_match(record, want, record["step"])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-3", "step-6", "step-8"]


def test_ddp_resume_with_the_same_world_size(launch, resumed, reference):
    root, first = launch
    out = root / "shared"
    assert all(s["steps"] is None and s["global_step"] == 5 for s in first["interrupted"])
    assert resumed[0]["shared"] == {"checkpoints": ["step-3"], "steps": [1, 2, 3, 4, 5]}

    second = resumed[1]["resumed"]
    for r, state in enumerate(second):
        assert state["steps"] == STEPS and state["global_step"] == STEPS, r
        assert [m["step"] for m in state["metrics"]] == list(range(4, STEPS + 1))
        assert_params_close(state["params"], first["full"][r]["params"])
        assert_params_close(state["params"], reference["params"])
    records = read_records(out / "metrics.jsonl")
    full = read_records(root / "out-0" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, want in zip(records, full, strict=True):
        assert_metrics_match(got, want, got["step"])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-3", "step-6", "step-8"]

    # The data order depends on the world size, so a 1-process resume is refused.
    policy, ref = make_models()
    with pytest.raises(ValueError, match="world_size"):
        DPO(policy, ref, **TRAINER_KW).fit(
            make_dataset(), output_dir=out, resume_from="latest", progress=False, **FIT_KW
        )


def test_fsdp2_matches_one_process_on_the_global_batch(launch, reference):
    ranks = launch[1]["fsdp"]
    policy, _ = make_models()
    initial = full_params(policy)
    for r, state in enumerate(ranks):
        assert state["steps"] == STEPS and state["global_step"] == STEPS, r
        assert [m["step"] for m in state["metrics"]] == list(range(1, STEPS + 1))
        assert all(math.isfinite(m["loss"]) and m["skipped"] == 0.0 for m in state["metrics"])
        assert any(not torch.equal(state["params"][k], initial[k]) for k in initial)
        # Sharded gradients are reduce-scattered as averages, as DDP all-reduces them: the
        # same update as one process on the global batch.
        for m, ref_m in zip(state["metrics"], reference["metrics"], strict=True):
            assert_metrics_match(m, ref_m, (r, m["step"]))
        assert_params_close(state["params"], reference["params"])
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name


def assert_optim_close(got: dict[str, Any], want: dict[str, Any], **tol: float) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for name, state in want["state"].items():
        assert state.keys() == got["state"][name].keys(), name
        for k, v in state.items():
            torch.testing.assert_close(got["state"][name][k], v, msg=f"{name}.{k}", **tol)


def test_fsdp2_checkpoints_hold_the_full_state(launch):
    from safetensors import safe_open

    root, first = launch
    assert not (root / "fsdp-1").exists(), "rank 1 must not write anything"
    out = root / "fsdp-0" / "checkpoints"
    assert sorted(p.name for p in out.iterdir()) == ["step-3", "step-6", "step-8"]
    meta = json.loads((out / "step-8" / "checkpoint.json").read_text())
    assert meta["optimizer_keys"] == "name" and meta["fit"]["world_size"] == WORLD
    ddp = root / "out-0" / "checkpoints" / "step-8"
    assert json.loads((ddp / "checkpoint.json").read_text())["optimizer_keys"] == "index"
    # The same weights file as an unsharded model's: full tensors, the tied head stored once.
    with (
        safe_open(out / "step-8" / "model.safetensors", "pt") as f,
        safe_open(ddp / "model.safetensors", "pt") as g,
    ):
        assert sorted(f.keys()) == sorted(g.keys())
        assert "tok_emb.weight" not in f.keys()
        assert f.metadata() == g.metadata() == {"tok_emb.weight": "lm_head.weight"}
        for k in f.keys():
            assert f.get_tensor(k).shape == g.get_tensor(k).shape, k

    # One process reads it into a plain model and optimizer: the FSDP run's final state, and
    # an optimizer state close to the DDP run's.
    fsdp = first["fsdp"][0]
    policy, ref = make_models()
    trainer = DPO(policy, ref, **TRAINER_KW)
    meta = load_checkpoint(out / "step-8", model=policy, optimizer=trainer.optimizer, rng=False)
    assert meta["step"] == STEPS
    for name, value in fsdp["params"].items():
        assert torch.equal(full_params(policy)[name], value), name
    want = torch.load(ddp / "optimizer.pt", weights_only=True)
    assert_optim_close(trainer.optimizer.state_dict(), want, rtol=1e-4, atol=1e-6)


def test_fsdp2_save_and_load(launch):
    root, first = launch
    ranks = first["fsdp"]
    for r, state in enumerate(ranks):
        assert state["reload_global_step"] == STEPS, r
        for name, value in state["params"].items():
            assert torch.equal(state["reload_params"][name], value), (r, name)
        # An index-keyed (DDP) checkpoint loads into a sharded model too.
        assert_params_close(state["ddp_load_params"], state["params"])
    # Rank 0 holds the gathered optimizer states (keyed by parameter name).
    optim = ranks[0]["optim"]
    assert "tok_emb.weight" in optim["state"] and len(optim["state"]) > 4
    assert_optim_close(ranks[0]["reload_optim"], optim, rtol=0, atol=0)
    # The last checkpoint keeps the schedule's final rate (linear: 0); once fit returns, the
    # trainer is back at its configured rate.
    ddp_optim = ranks[0]["ddp_load_optim"]
    assert [g["lr"] for g in ddp_optim["param_groups"]] == [0.0]
    assert [g["lr"] for g in optim["param_groups"]] == [TRAINER_KW["learning_rate"]]
    ddp_optim["param_groups"] = [
        dict(g, lr=TRAINER_KW["learning_rate"]) for g in ddp_optim["param_groups"]
    ]
    assert_optim_close(ddp_optim, optim, rtol=1e-4, atol=1e-6)
    assert ranks[1]["optim"] == {}

    # A single process loads the sharded trainer's save into a plain model.
    policy, ref = make_models()
    loaded = DPO.load(root / "fsdp-saved", policy, ref)
    assert loaded.global_step == STEPS
    for name, value in ranks[0]["params"].items():
        assert torch.equal(full_params(policy)[name], value), name
    names = [n for n, _ in policy.named_parameters()]
    got = loaded.optimizer.state_dict()
    assert {names[i] for i in got["state"]} == set(optim["state"])
    for i, state in got["state"].items():
        for k, v in state.items():
            assert torch.equal(v, optim["state"][names[i]][k]), (names[i], k)


def test_fsdp2_resume_with_the_same_world_size(launch, resumed, reference):
    root, first = launch
    assert all(s["steps"] is None and s["global_step"] == 5 for s in first["fsdp_interrupted"])
    assert resumed[0]["fsdp-shared"] == {"checkpoints": ["step-3"], "steps": [1, 2, 3, 4, 5]}
    for r, state in enumerate(resumed[1]["fsdp_resumed"]):
        assert state["steps"] == STEPS and state["global_step"] == STEPS, r
        assert [m["step"] for m in state["metrics"]] == list(range(4, STEPS + 1))
        assert_params_close(state["params"], first["fsdp"][r]["params"])
        assert_params_close(state["params"], reference["params"])
    out = root / "fsdp-shared"
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-3", "step-6", "step-8"]


def test_fsdp2_precompute_reference_with_a_sharded_reference(launch):
    root, first = launch
    policy, ref = make_models()
    want = DPO(policy, ref, **TRAINER_KW).precompute_reference(make_dataset(), **PRECOMPUTE_KW)
    for r, got in enumerate(first["fsdp_reference"]):
        # The whole tensors are hashed: the key (weights digest included) is the unsharded one's.
        assert json.loads(got["key"]) == want.key, r
        np.testing.assert_allclose(got["chosen"].numpy(), want.chosen, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["rejected"].numpy(), want.rejected, rtol=0, atol=1e-5)
        assert not np.isnan(got["chosen"].numpy()).any()
    # Rank 0 wrote the cache next to the store.
    rank0 = first["fsdp_reference"][0]
    path = Path(rank0["path"])
    assert path.parent == root / "store" / "reference_logps" and path.is_file()
    assert np.array_equal(np.load(path), torch.stack([rank0["chosen"], rank0["rejected"]]).numpy())


@pytest.mark.parametrize("job", ["emptied", "fsdp_emptied"])
def test_a_rank_emptied_by_truncation_joins_with_a_zero_weight_stand_in(launch, job):
    """DDP and FSDP2: no hang, and fit / evaluate / train_step equal one process on the union.

    abs 1e-5 as in :func:`assert_metrics_match` (chunked vs whole LM head on an FSDP2 root).
    """
    ranks = launch[1][job]
    want = emptied_reference()
    assert [r["batch_pairs"] for r in ranks] == [2, 0]
    for got in ranks:
        assert len(got["metrics"]) == len(want["metrics"]) == 4
        for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"], strict=True)):
            assert g["skipped"] == w["skipped"] == 0.0
            for key in ("loss", "reward_accuracy", "chosen_reward", "grad_norm"):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-5), (step, key)
        assert_params_close(got["fit_params"], want["fit_params"])
        assert got["eval"]["num_pairs"] == want["eval"]["num_pairs"] == 13
        assert got["eval"]["num_dropped"] == want["eval"]["num_dropped"] == 3
        for key in ("loss", "reward_margin", "chosen_logps"):
            assert got["eval"][key] == pytest.approx(want["eval"][key], rel=1e-5, abs=1e-5)
        for key in ("loss", "reward_margin", "grad_norm"):
            assert got["step"][key] == pytest.approx(want["step"][key], rel=1e-5, abs=1e-5)
        assert got["step"]["skipped"] == 0.0
        assert_params_close(got["step_params"], want["step_params"])
        # FSDP2 reduce-scatters once per step: 4 steps of 2 micro-batches each switch the sync
        # off for the first and back on after it; train_step's single batch never switches.
        assert got["gradient_syncs"] == ([False, True] * 4 if job == "fsdp_emptied" else [])


def test_fsdp2_accumulation_reduce_scatters_once_per_step(launch):
    """3 micro-batches per step: the sync is skipped for the first two (one reduce-scatter per
    FSDP group and step instead of three), and the weights equal both a sync on every
    micro-batch and one process on the union batch."""
    skipped, every = launch[1]["fsdp_accumulate"], launch[1]["fsdp_accumulate_sync_every"]
    want = accumulate_reference()
    assert len(want["metrics"]) == ACCUMULATE_STEPS
    policy, _ = make_models()
    initial = full_params(policy)
    for got, forced in zip(skipped, every, strict=True):
        assert got["reduce_scatters"] == ACCUMULATE_STEPS * FSDP_GROUPS
        assert forced["reduce_scatters"] == 3 * ACCUMULATE_STEPS * FSDP_GROUPS
        assert any(not torch.equal(got["params"][k], initial[k]) for k in initial)
        assert_params_close(got["params"], forced["params"])
        assert_params_close(got["params"], want["params"])
        for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"], strict=True)):
            assert g["skipped"] == w["skipped"] == 0.0
            for key in ("loss", "reward_accuracy", "chosen_reward", "grad_norm"):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-5), (step, key)


if __name__ == "__main__":
    worker(sys.argv[1:])


HF_FSDP_SCRIPT = r"""
import copy, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from rlox import DPO

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
plain = LlamaForCausalLM(config)
refs = [copy.deepcopy(plain), copy.deepcopy(plain)]
sharded = copy.deepcopy(plain)
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)
gen = torch.Generator().manual_seed(1)
prompt, chosen, rejected = (torch.randint(1, 48, (4, n), generator=gen) for n in (5, 4, 3))
out = []
for model, ref in zip((plain, sharded), refs):
    trainer = DPO(model, ref, learning_rate=1e-2)
    losses = [trainer.train_step(prompt, chosen, rejected)["loss"] for _ in range(3)]
    out.append(losses)
print(out[0])
print(out[1])
diff = max(abs(a - b) for a, b in zip(*out))
assert all(torch.isfinite(torch.tensor(out[1]))), out
assert diff < 1e-5, (diff, out)
assert out[1][-1] < out[1][0], out
dist.destroy_process_group()
"""


def test_fsdp2_sharded_hugging_face_model_trains_like_the_unsharded_one(tmp_path):
    """A Hugging Face model sharded at its layers and root runs its full forward (the root's
    hook gathers embeddings, norm and head), so its losses equal the unsharded model's."""
    script = tmp_path / "hf_fsdp.py"
    script.write_text(HF_FSDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
