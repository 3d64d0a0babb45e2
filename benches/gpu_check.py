"""rlox against TRL 1.16 at a ~0.5B scale on one GPU, with the correctness checks of the GPU paths.

Usage: python benches/gpu_check.py [--steps 10] [--warmup 3] [--timeout 300]
       python benches/gpu_check.py --device cpu --tiny      (a dry run: tiny sizes, on the CPU)

No network: the model is a Llama-style config built in memory (Qwen2-0.5B-like: hidden 896,
24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936, tied embeddings; ~494M parameters),
float32 weights under bf16 autocast, on UltraFeedback-like synthetic pairs at full length
(benches/_common.py), max_length 2048, 8 pairs per step, AdamW (fused on CUDA).

Correctness (PASS/FAIL; the exit status is 1 if any check fails):
  1. attention routes against the dense mask: a tiny float32 Llama, TF32 off, one ``train_step``
     (SGD with lr 0) per packed / prefix_shared batch with ``attention="flex"`` (CUDA only: torch
     2.15 has no FlexAttention backward on the CPU, so it is skipped there) and ``"varlen"``
     against ``"dense"``: loss, mean chosen/rejected log-probs and every gradient agree to 1e-5
     (relative to the largest value).
  2. ``activation_offloading=True``: two steps run and give the losses and gradients of the run
     without it (1e-5).
  A check whose option this rlox does not have prints SKIP with the reason.

Throughput: rlox ``padded``, ``packed`` and ``prefix_shared`` (``attention="auto"``,
``logits_chunk_size=None`` (auto, the chunked LM head), ``gradient_checkpointing=True``, each
where rlox has it) and TRL at its defaults (bf16, gradient checkpointing, its fused AdamW), each in
its own process: tokens/s and peak CUDA memory side by side, against the targets packed >= 1.3x
padded, prefix_shared >= 1.6x padded, best layout >= 2x TRL, peak memory <= 40% of TRL's. A
target that is missed prints BELOW (not a failure); an rlox run that crashes is a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import rlox
import rlox.attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Setup,
    make_models,
    make_pairs,
    param_count,
    run_contender,
    supported_options,
)
from bench_train import table  # noqa: E402

LAYOUTS = ("padded", "packed", "prefix_shared")
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def skip(name: str, why: str) -> None:
    print(f"SKIP  {name}: {why}", flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1e-12)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def tiny_setup(device: str) -> Setup:
    return Setup(
        vocab=256, hidden=64, layers=2, heads=4, max_length=96, batch=4, steps=1, device=device
    )


def step_once(
    s: Setup, options: dict[str, Any], batch: Any, steps: int = 1
) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    """``steps`` ``train_step`` calls (SGD with lr 0: the weights stay) on ``batch``; the metrics
    of each and the gradients of the last."""
    policy, ref = make_models(s)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    trainer = rlox.DPO(policy, ref, max_grad_norm=None, optimizer=opt, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*learning rate.* is 0")
        metrics = [trainer.train_step(batch) for _ in range(steps)]
    return metrics, [p.grad.detach().clone() for p in policy.parameters()]


def compare(name: str, got: tuple[list, list], want: tuple[list, list], tol: float) -> None:
    errs = {
        k: max(
            rel_err(torch.tensor(g[k]), torch.tensor(w[k]))
            for g, w in zip(got[0], want[0], strict=True)
        )
        for k in ("loss", "chosen_logps", "rejected_logps")
    }
    errs["grads"] = max(rel_err(g, w) for g, w in zip(got[1], want[1], strict=True))
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    check(name, max(errs.values()) <= tol, f"max relative error {detail} (tolerance {tol:g})")


def correctness(device: str) -> None:
    s = tiny_setup(device)
    pairs = make_pairs(dataclasses.replace(s, steps=1))
    data = rlox.PreferenceDataset.from_lists(*(list(c) for c in zip(*pairs, strict=True)))
    idx = list(range(len(pairs)))
    has = supported_options(("attention", "activation_offloading"))
    routes = [r for r in ("flex", "varlen") if r in getattr(rlox.attention, "ATTENTION", ())]
    if not has["attention"]:
        skip("attention routes vs dense", "rlox.DPO has no attention option")
        routes = []
    if device == "cpu" and "flex" in routes:
        skip("flex attention vs dense", "flex_attention has no backward on the CPU (torch 2.15)")
        routes.remove("flex")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for layout in ("packed", "prefix_shared"):  # padded rows always use their 2-D mask
        batch = data.collate(idx, layout=layout, max_length=s.max_length)
        dense = step_once(s, {"attention": "dense"}, batch)
        for route in routes:
            name = f"attention={route!r} vs 'dense', {layout}"
            try:
                got = step_once(s, {"attention": route}, batch)
            except (ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
                check(name, False, f"raised {type(exc).__name__}: {exc}")
                continue
            compare(name, got, dense, 1e-5)
    if not has["activation_offloading"]:
        skip("activation_offloading", "rlox.DPO has no activation_offloading option")
        return
    batch = data.collate(idx, layout="padded", max_length=s.max_length)
    plain = step_once(s, {}, batch, steps=2)
    try:
        offloaded = step_once(s, {"activation_offloading": True}, batch, steps=2)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        if device == "cpu":
            skip("activation_offloading", f"not on the CPU: {exc}")
            return
        raise
    compare("activation_offloading matches the run without it", offloaded, plain, 1e-5)


def big_setup(args: argparse.Namespace) -> Setup:
    if args.tiny:
        return Setup(
            vocab=1024,
            hidden=64,
            layers=2,
            max_length=256,
            steps=4,
            warmup=1,
            device=args.device,
            dtype="bf16",
        )
    return Setup(
        vocab=151936,
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        tie_embeddings=True,
        max_length=2048,
        steps=args.steps,
        warmup=args.warmup,
        lr=5e-7,
        device=args.device,
        dtype="bf16",
        threads=args.threads,
        fused_adamw=args.device.startswith("cuda"),
    )


def throughput(args: argparse.Namespace) -> None:
    s = big_setup(args)
    wanted = {"attention": "auto", "logits_chunk_size": None, "gradient_checkpointing": True}
    has = supported_options(tuple(wanted))
    options = {k: v for k, v in wanted.items() if has[k]}
    missing = [k for k, ok in has.items() if not ok]
    print(
        f"\n## throughput: Llama hidden {s.hidden} x {s.layers} layers, vocab {s.vocab}, "
        f"{param_count(s) / 1e6:.1f}M parameters, ultrafeedback-like, max_length {s.max_length}, "
        f"{s.batch} pairs/step, bf16 autocast, {s.steps} steps ({s.warmup} warm-up)\n"
        f"rlox options: {options or 'defaults'}"
        + (f" (this rlox lacks {missing})" if missing else ""),
        flush=True,
    )
    specs = [
        (
            "TRL defaults",
            "bf16, grad ckpt, its optim",
            dict(contender="trl", bf16=True, checkpointing=True, default_optim=True),
        )
    ]
    specs += [
        (
            f"rlox {layout}",
            str(options or "defaults"),
            dict(contender="rlox", layout=layout, options=options),
        )
        for layout in LAYOUTS
    ]
    rows = []
    for name, setting, spec in specs:
        res = run_contender(dict(spec, setup=dataclasses.asdict(s)), timeout=args.timeout)
        done = "ERROR " + res["error"] if "error" in res else f"{res['tokens_per_s']:,.0f} tokens/s"
        print(f"  {name}: {done}", flush=True)
        if "error" in res and name.startswith("rlox"):
            check(f"{name} runs", False, res["error"])
        rows.append((name, setting, [res]))
    cuda = s.device.startswith("cuda")
    table(rows, "TRL defaults", cuda)
    targets(dict((n, r[0]) for n, _, r in rows), cuda, dry=args.tiny)


def targets(res: dict[str, dict[str, Any]], cuda: bool, dry: bool) -> None:
    """The ratios against the targets (BELOW is reported, not a failure)."""
    mem = "cuda_peak_mib" if cuda else "peak_rss_mib"
    tps = {n: r.get("tokens_per_s") for n, r in res.items()}
    note = " (dry run: tiny sizes on CPU, not meaningful)" if dry else ""
    print(f"\ntargets{note}:")

    def line(what: str, num: str, den: str, want: float, less: bool = False) -> None:
        a, b = (
            res[num].get(mem if less else "tokens_per_s"),
            res[den].get(mem if less else "tokens_per_s"),
        )
        if a is None or b is None:
            print(f"  {what}: n/a (a run failed)")
            return
        ratio = a / b
        ok = ratio <= want if less else ratio >= want
        print(
            f"  {what}: {ratio:.2f}x ({'<=' if less else '>='} {want:g}x) {'MET' if ok else 'BELOW'}"
        )

    line("packed vs padded tokens/s", "rlox packed", "rlox padded", 1.3)
    line("prefix_shared vs padded tokens/s", "rlox prefix_shared", "rlox padded", 1.6)
    layouts = [n for n in res if n.startswith("rlox") and tps[n] is not None]
    if layouts:
        best = max(layouts, key=lambda n: tps[n])
        line(f"best layout ({best}) vs TRL defaults tokens/s", best, "TRL defaults", 2.0)
        line(
            f"{best} vs TRL defaults peak {'CUDA' if cuda else 'RSS'} memory",
            best,
            "TRL defaults",
            0.4,
            less=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a dry run of the script)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads per process")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per contender run")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("CUDA is not available; use --device cpu --tiny for a dry run")
    print(
        f"rlox, torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    correctness(args.device)
    throughput(args)
    print(f"\n{len(FAILURES)} failed check(s){': ' + ', '.join(FAILURES) if FAILURES else ''}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
