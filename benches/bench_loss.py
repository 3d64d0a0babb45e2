"""Every preference loss over precomputed log-probs: Rust kernel vs torch eager forward + backward.

Usage: python benches/bench_loss.py [--pairs 1000000 10000000] [--repeats 5] [--threads 2]

For each loss type (and each f-divergence, an MPO-style weighted mix, and the mix with WPO pair
weights) and each size, prints
median wall times side by side: the Rust kernel (numpy in; loss, per-pair losses, gradients,
rewards and metrics in one call), the differentiable ``rlox.losses.dpo_loss`` entry on CPU
(the Rust kernel inside autograd, forward + backward), and torch eager (the same formulas as
plain differentiable torch ops, forward + backward + rewards), and the torch / Rust ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

import rlox
from rlox.losses import LOSS_TYPES, _torch_terms, check_loss_options
from rlox.losses import dpo_loss as torch_entry

LENGTH_TYPES = {"ipo", "sigmoid_norm", "simpo", "cpo", "orpo", "sft"}


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases() -> list[tuple[str, dict, bool]]:
    """(name, loss options, whether pair weights are passed)."""
    out = []
    for t in LOSS_TYPES:
        opts = {"loss_type": t}
        if t in ("exo_pair", "cdpo"):
            opts["label_smoothing"] = 0.1
        out.append((t, opts, False))
    for div in ("forward_kl", "js_divergence", "alpha_divergence"):
        out.append((f"sigmoid+{div}", {"loss_type": "sigmoid", "f_divergence": div}, False))
    mix = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    out.append(("mpo mix", mix, False))
    out.append(("mpo mix + pair_weights", mix, True))
    return out


def torch_eager(tens, tlens, opts, terms, weights=None):
    """Forward + backward of the loss as plain torch ops, plus the rewards."""
    pc = tens[0].detach().requires_grad_()
    pr = tens[1].detach().requires_grad_()
    rc, rr = tens[2], tens[3]
    losses, _, _ = _torch_terms(pc, pr, rc, rr, tlens[0], tlens[1], opts, terms, weights)
    loss = losses.mean()
    loss.backward()
    with torch.no_grad():
        _ = (0.1 * (pc - rc), 0.1 * (pr - rr))
    return loss


def bench_size(n: int, repeats: int) -> None:
    """One table: every case on ``n`` float32 pairs."""
    rng = np.random.default_rng(0)
    arrs = [(rng.standard_normal(n) * 20 - 150).astype(np.float32) for _ in range(4)]
    lens = [rng.integers(1, 512, n).astype(np.int64) for _ in range(2)]
    tens = [torch.from_numpy(a) for a in arrs]
    tlens = [torch.from_numpy(x) for x in lens]
    weights = rng.uniform(0.0, 2.0, n).astype(np.float32)
    tweights = torch.from_numpy(weights)
    print(f"\n{n:,} pairs")
    header = (
        f"{'loss':24} {'rust kernel':>12} {'rlox.losses':>12} {'torch eager':>12} "
        f"{'torch/rust':>11} {'Mpairs/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, opts, weighted in cases():
        info = check_loss_options(**opts)
        full = {
            **{
                k: v
                for k, v in rlox.losses.LOSS_DEFAULTS.items()
                if k not in ("loss_type", "loss_weights")
            },
            **opts,
        }
        terms = [(t, float(w)) for t, w in info["terms"]]
        kw = (
            {"chosen_lengths": lens[0], "rejected_lengths": lens[1]}
            if info["needs_lengths"]
            else {}
        )
        tkw = (
            {"chosen_lengths": tlens[0], "rejected_lengths": tlens[1]}
            if info["needs_lengths"]
            else {}
        )
        if weighted:
            kw = {**kw, "pair_weights": weights}
            tkw = {**tkw, "pair_weights": tweights}
        t_rust = timeit(lambda opts=opts, kw=kw: rlox.dpo_loss(*arrs, **opts, **kw), repeats)

        def entry(opts=opts, tkw=tkw):
            pc = tens[0].detach().requires_grad_()
            pr = tens[1].detach().requires_grad_()
            torch_entry(pc, pr, tens[2], tens[3], **opts, **tkw).loss.backward()

        t_entry = timeit(entry, repeats)
        w = tweights if weighted else None
        t_torch = timeit(
            lambda full=full, terms=terms, w=w: torch_eager(tens, tlens, full, terms, w), repeats
        )
        print(
            f"{name:24} {t_rust * 1e3:9.1f} ms {t_entry * 1e3:9.1f} ms "
            f"{t_torch * 1e3:9.1f} ms {t_torch / t_rust:10.2f}x {n / t_rust / 1e6:9.0f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"rlox {rlox.__version__} | torch {torch.__version__} ({args.threads} threads) | "
        f"numpy {np.__version__} | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores | float32 pairs, median of {args.repeats}"
    )
    for n in args.pairs:
        bench_size(n, args.repeats if n <= 2_000_000 else max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
