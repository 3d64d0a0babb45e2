"""DPO loss over precomputed log-probs: Rust kernel vs torch eager (forward + backward) vs numpy.

Usage: python benches/bench_loss.py [--pairs 10000000] [--repeats 7] [--threads 2]
Prints median wall times side by side, the ratios, and pairs/s against the floor of reading the
four input arrays once.
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
from rlox.losses import dpo_loss as torch_entry


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def numpy_loss(pc, pr, rc, rr, beta, loss_type, lc, lr):
    uc, ur = pc - rc, pr - rr
    n = pc.shape[0]
    if loss_type == "ipo":
        d = uc / lc - ur / lr - 1.0 / (2 * beta)
        losses = d * d
        g = 2 * d / n
        gc, gr = g / lc, -g / lr
    else:
        z = beta * (uc - ur)
        if loss_type == "sigmoid":
            losses = np.logaddexp(0, -z)
            g = -beta / (1 + np.exp(z)) / n
        else:
            h = 1 - z
            losses = np.maximum(h, 0)
            g = np.where(h > 0, -beta / n, 0).astype(pc.dtype)
        gc, gr = g, -g
    return losses.mean(), losses, gc, gr, beta * uc, beta * ur


def torch_eager(pc, pr, rc, rr, beta, loss_type, lc, lr):
    pc = pc.detach().requires_grad_()
    pr = pr.detach().requires_grad_()
    uc, ur = pc - rc, pr - rr
    if loss_type == "ipo":
        losses = (uc / lc - ur / lr - 1.0 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * (uc - ur))
    else:
        losses = torch.relu(1 - beta * (uc - ur))
    loss = losses.mean()
    loss.backward()
    with torch.no_grad():
        beta * uc.detach(), beta * ur.detach()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.pairs
    rng = np.random.default_rng(0)
    arrs = [(rng.standard_normal(n) * 20 - 150).astype(np.float32) for _ in range(4)]
    lens = [rng.integers(1, 512, n).astype(np.int64) for _ in range(2)]
    lens_f = [x.astype(np.float32) for x in lens]
    tens = [torch.from_numpy(a) for a in arrs]
    tlens = [torch.from_numpy(x) for x in lens_f]
    tlens_int = [torch.from_numpy(x) for x in lens]
    print(
        f"rlox {rlox.__version__} | torch {torch.__version__} ({args.threads} threads) | "
        f"numpy {np.__version__} | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores | {n:,} float32 pairs, median of {args.repeats}"
    )
    floor = timeit(lambda: [np.add.reduce(a) for a in arrs], args.repeats)
    print(f"floor: read four input arrays once (numpy sum): {floor * 1e3:8.1f} ms")
    header = f"{'loss':8} {'rust kernel':>12} {'rlox.losses':>12} {'torch eager':>12} {'numpy':>10} {'torch/rust':>11} {'numpy/rust':>11} {'Mpairs/s':>9} {'floor/rust':>10}"
    print(header)
    print("-" * len(header))
    for lt in ("sigmoid", "hinge", "ipo"):
        kw = {"chosen_lengths": lens[0], "rejected_lengths": lens[1]} if lt == "ipo" else {}
        tkw = (
            {"chosen_lengths": tlens_int[0], "rejected_lengths": tlens_int[1]}
            if lt == "ipo"
            else {}
        )
        t_rust = timeit(
            lambda lt=lt, kw=kw: rlox.dpo_loss(*arrs, beta=0.1, loss_type=lt, **kw), args.repeats
        )

        def entry(lt=lt, tkw=tkw):
            pc = tens[0].detach().requires_grad_()
            pr = tens[1].detach().requires_grad_()
            torch_entry(pc, pr, tens[2], tens[3], beta=0.1, loss_type=lt, **tkw).loss.backward()

        t_entry = timeit(entry, args.repeats)
        t_torch = timeit(lambda lt=lt: torch_eager(*tens, 0.1, lt, *tlens), args.repeats)
        t_np = timeit(lambda lt=lt: numpy_loss(*arrs, 0.1, lt, *lens_f), max(2, args.repeats // 2))
        print(
            f"{lt:8} {t_rust * 1e3:9.1f} ms {t_entry * 1e3:9.1f} ms {t_torch * 1e3:9.1f} ms "
            f"{t_np * 1e3:7.1f} ms {t_torch / t_rust:10.2f}x {t_np / t_rust:10.2f}x "
            f"{n / t_rust / 1e6:9.0f} {floor / t_rust:10.2f}"
        )


if __name__ == "__main__":
    main()
