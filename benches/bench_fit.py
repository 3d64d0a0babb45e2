"""DPO.fit throughput per collation layout, and the time the reference cache saves.

Usage: python benches/bench_fit.py [--steps 32] [--batch-size 16] [--scale 0.25] [--threads 2]
                                   [--quick]

Workloads:

- ``demo``: the model of ``rlox.demo`` (``DemoConfig()``: a TinyCausalLM of d_model 64, 2
  layers, 4 heads, 14-token vocabulary) on its digit-sorting pairs (4-7 digits), 64 pairs a step
  as in the demo.
- ``ultrafeedback`` and ``hh``: a small TinyCausalLM (``--d-model``, ``--layers``, ``--vocab``)
  on the synthetic length profiles of ``benches/bench_data.py`` (``make_columns``: lognormal
  lengths, sigma 0.7), with every median scaled by ``--scale`` so that the run fits two CPU
  cores, ids folded into the small vocabulary, and ``--max-length`` truncation.

For each workload the dataset holds exactly ``steps x batch`` pairs, so one epoch is ``steps``
optimizer steps. It measures:

1. ``DPO.fit`` with a live reference model in each layout (``padded``, ``packed`` with
   ``pack_length = --pack-factor x max_length``, ``prefix_shared``): steady steps/s and
   completion tokens/s (chosen + rejected tokens after truncation) between the end of the
   first step and the end of the last, plus the whole call's wall time;
2. the reference cache: ``precompute_reference`` once over the dataset, then ``DPO.fit`` of a
   trainer built without a reference model (``precomputed_reference=True``), against the live
   ``padded`` fit of (1). Saved = live fit - (precompute + cached fit); every further epoch
   saves live fit - cached fit.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rlox
from rlox import DPO, PreferenceDataset
from rlox.data import LAYOUTS
from rlox.demo import (
    VOCAB_SIZE,
    DemoConfig,
    build_model,
    correct_answer,
    corrupt_answer,
    encode_prompt,
    sample_digits,
)
from rlox.models import TinyCausalLM, TinyLMConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import NAMES, PROFILES, make_columns  # noqa: E402


@dataclass
class Workload:
    name: str
    make_policy: Any  # () -> nn.Module, the same initial weights on every call
    dataset: Any  # () -> PreferenceDataset, a fresh object (its own reference cache) per call
    batch_size: int
    max_length: int
    pack_length: int
    note: str
    params: int = 0
    pairs: int = 0


@dataclass
class FitRun:
    wall: float  # the whole fit call
    steady: float  # end of step 1 to end of the last step
    steps: int
    tokens: int  # completion tokens of steps 2..last
    rows: list[int] = field(default_factory=list)  # input_ids elements of each step's batch

    @property
    def steps_per_s(self) -> float:
        return (self.steps - 1) / self.steady

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.steady


# ---------------------------------------------------------------------------- workloads
def demo_workload(pairs: int, seed: int, pack_factor: int) -> Workload:
    config = DemoConfig()
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(pairs):
        digits = sample_digits(rng, config.min_digits, config.max_digits)
        prompts.append(encode_prompt(digits))
        chosen.append(correct_answer(digits))
        rejected.append(corrupt_answer(rng, digits))
    max_length = 2 * config.max_digits + 4  # the demo model's positions
    return Workload(
        name="demo",
        make_policy=lambda: build_model(config),
        dataset=lambda: PreferenceDataset.from_lists(prompts, chosen, rejected),
        batch_size=config.dpo_batch_size,
        max_length=max_length,
        pack_length=pack_factor * max_length,
        note=(
            f"DemoConfig(): d_model {config.d_model}, {config.n_layers} layers, "
            f"{config.n_heads} heads, vocab {VOCAB_SIZE}; {config.min_digits}-{config.max_digits} digits"
        ),
    )


def synthetic_workload(name: str, pairs: int, seed: int, args: argparse.Namespace) -> Workload:
    prompt_median, response_median = PROFILES[name]
    pm = max(1, round(prompt_median * args.scale))
    rm = max(1, round(response_median * args.scale))
    cols = make_columns(pairs, pm, rm, seed)
    for key in NAMES:
        if key.endswith("_values"):  # fold ids in [1, 32000) into [1, vocab)
            cols[key] = (cols[key] % (args.vocab - 1) + 1).astype(np.int32)
    config = TinyLMConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.max_length,
    )

    def make_policy() -> nn.Module:
        torch.manual_seed(seed)
        return TinyCausalLM(config)

    return Workload(
        name=name,
        make_policy=make_policy,
        dataset=lambda: PreferenceDataset.from_arrays(*(cols[k] for k in NAMES)),
        batch_size=args.batch_size,
        max_length=args.max_length,
        pack_length=args.pack_factor * args.max_length,
        note=(
            f"medians prompt {prompt_median}->{pm}, responses {response_median}->{rm} "
            f"(x{args.scale:g}); d_model {args.d_model}, {args.layers} layers, "
            f"{args.heads} heads, vocab {args.vocab}"
        ),
    )


# ---------------------------------------------------------------------------- measurements
def fit_kwargs(w: Workload, layout: str) -> dict[str, Any]:
    return {
        "batch_size": w.batch_size,
        "layout": layout,
        "max_length": w.max_length,
        "pack_length": w.pack_length if layout == "packed" else None,
        "seed": 0,
        "log_every": None,
        "progress": False,
    }


def plan_tokens(ds: PreferenceDataset, w: Workload, layout: str) -> tuple[list[int], list[int]]:
    """Completion tokens and input_ids elements of each batch fit takes in epoch 0."""
    kw = fit_kwargs(w, layout)
    data = {k: kw[k] for k in ("layout", "max_length", "pack_length")}
    plan = ds.batches(batch_size=w.batch_size, seed=kw["seed"], epoch=0, **data)
    tokens, rows = [], []
    for idx in plan:
        b = ds.collate(idx, **data)
        tokens.append(int(b.chosen_lengths.sum() + b.rejected_lengths.sum()))
        rows.append(int(b.input_ids.numel()))
    return tokens, rows


def timed_fit(trainer: DPO, ds: PreferenceDataset, w: Workload, layout: str) -> FitRun:
    stamps: list[float] = []
    result = trainer.fit(
        ds, callback=lambda step, m: stamps.append(time.perf_counter()), **fit_kwargs(w, layout)
    )
    tokens, rows = plan_tokens(ds, w, layout)
    assert result.steps == len(stamps) == len(tokens), "one epoch is the whole plan"
    return FitRun(
        wall=result.seconds,
        steady=stamps[-1] - stamps[0],
        steps=result.steps,
        tokens=sum(tokens[1:]),
        rows=rows,
    )


def warm_up(w: Workload) -> None:
    """A few untimed steps in every layout (first calls pay one-off setup costs)."""
    ds = w.dataset()
    for layout in LAYOUTS:
        policy = w.make_policy()
        trainer = DPO(policy, copy.deepcopy(policy))
        trainer.fit(ds, max_steps=2, **fit_kwargs(w, layout))


def bench(w: Workload) -> dict[str, Any]:
    warm_up(w)
    out: dict[str, Any] = {}
    for layout in LAYOUTS:
        policy = w.make_policy()
        trainer = DPO(policy, copy.deepcopy(policy))
        out[layout] = timed_fit(trainer, w.dataset(), w, layout)
    ds = w.dataset()  # a fresh object: the live fits above never see its cache
    policy = w.make_policy()
    ref = copy.deepcopy(policy)
    trainer = DPO(policy, ref)
    t0 = time.perf_counter()
    trainer.precompute_reference(
        ds, batch_size=w.batch_size, max_length=w.max_length, progress=False
    )
    out["precompute"] = time.perf_counter() - t0
    del trainer, ref
    cached = DPO(w.make_policy(), None, precomputed_reference=True)
    out["cached"] = timed_fit(cached, ds, w, "padded")
    return out


# ---------------------------------------------------------------------------- report
def secs(t: float) -> str:
    return f"{t:,.2f} s"


def table(title: str, cols: list[str], rows: list[tuple[str, list[str]]]) -> None:
    width = max(10, *(len(c) + 2 for c in cols), *(len(x) + 2 for _, r in rows for x in r))
    label = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print(" " * label + "".join(f"{c:>{width}}" for c in cols))
    print("-" * (label + width * len(cols)))
    for name, cells in rows:
        print(f"{name:{label}}" + "".join(f"{c:>{width}}" for c in cells))


def report(workloads: list[Workload], res: dict[str, dict[str, Any]]) -> None:
    rows = []
    for w in workloads:
        r = res[w.name]
        base = r["padded"]
        for layout in LAYOUTS:
            run = r[layout]
            rows.append(
                (
                    f"{w.name} {layout}",
                    [
                        f"{run.steps}",
                        f"{run.steps_per_s:,.2f}",
                        f"{run.tokens_per_s:,.0f}",
                        f"{run.steps_per_s / base.steps_per_s:.2f}x",
                        f"{np.mean(run.rows):,.0f}",
                        secs(run.wall),
                    ],
                )
            )
    table(
        "DPO.fit with a live reference, one epoch per layout (steady: end of step 1 to the last)",
        ["steps", "steps/s", "compl tok/s", "vs padded", "ids/step", "fit wall"],
        rows,
    )
    print(
        "compl tok/s: chosen + rejected completion tokens after truncation, per second; "
        "ids/step: mean elements of input_ids per step (rows x row length, padding included)."
    )

    rows = []
    for w in workloads:
        r = res[w.name]
        live, cached, pre = r["padded"].wall, r["cached"].wall, r["precompute"]
        rows.append(
            (
                w.name,
                [
                    secs(live),
                    secs(pre),
                    secs(cached),
                    secs(pre + cached),
                    f"{live / (pre + cached):.2f}x",
                    secs(live - pre - cached),
                    secs(live - cached),
                    f"{r['cached'].steps_per_s / r['padded'].steps_per_s:.2f}x",
                ],
            )
        )
    table(
        "Reference cache, padded layout, one epoch (walls of whole calls)",
        [
            "live fit",
            "precompute",
            "cached fit",
            "pre+cached",
            "live/total",
            "saved",
            "saved/epoch+",
            "steps/s x",
        ],
        rows,
    )
    print(
        "saved: live fit - (precompute + cached fit) for one epoch; saved/epoch+: what every "
        "further epoch saves (live fit - cached fit); steps/s x: cached / live steady steps/s. "
        "The cached trainer holds no reference model:"
    )
    for w in workloads:
        print(f"  {w.name}: {w.params:,} reference parameters not kept in memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps (one epoch)")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs/step, synthetic profiles")
    ap.add_argument("--scale", type=float, default=0.25, help="factor on the median lengths")
    ap.add_argument("--max-length", type=int, default=128, help="truncation, synthetic profiles")
    ap.add_argument("--pack-factor", type=int, default=4, help="pack_length / max_length")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="6 steps, lengths x0.125: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.scale = 6, 0.125
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"rlox {rlox.__version__} | torch {torch.__version__} ({args.threads} threads) | numpy "
        f"{np.__version__} | {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores | load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if args.quick:
        print("--quick: a smoke run (6 steps, lengths x0.125); not a measurement")
    if load[0] >= 1.0:
        print(
            "note: the machine is busy (1-minute load average >= 1), so timings are not "
            "comparable; next to other processes, --threads 1 avoids intra-op thread contention"
        )
    print(
        f"{args.steps} steps per run; sigmoid loss, Adam; synthetic profiles: {args.batch_size} "
        f"pairs/step, max_length {args.max_length}; packed rows of pack_factor x max_length"
    )
    workloads = [demo_workload(args.steps * DemoConfig().dpo_batch_size, 0, args.pack_factor)]
    for seed, name in enumerate(PROFILES, start=1):
        workloads.append(synthetic_workload(name, args.steps * args.batch_size, seed, args))
    res: dict[str, dict[str, Any]] = {}
    for w in workloads:
        ds = w.dataset()
        w.pairs = len(ds)
        w.params = sum(p.numel() for p in w.make_policy().parameters())
        lens = ds.lengths()
        print(
            f"{w.name}: {w.note}; {w.pairs:,} pairs, mean prompt/chosen/rejected "
            f"{lens.prompt.mean():.0f}/{lens.chosen.mean():.0f}/{lens.rejected.mean():.0f} "
            f"tokens; {w.batch_size} pairs/step, max_length {w.max_length}, pack_length "
            f"{w.pack_length}; {w.params:,} parameters"
        )
        t0 = time.perf_counter()
        res[w.name] = bench(w)
        print(f"  measured in {secs(time.perf_counter() - t0)}")
    report(workloads, res)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
