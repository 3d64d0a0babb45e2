"""The CUDA path of rlox, checked and timed on a GPU machine.

Usage: python benches/cuda_check.py [--steps 40] [--device cuda]   (--device cpu: a dry run)

Checks (each prints PASS/FAIL with the measured error; the exit status is 1 if any fails):
  1. every loss type: the torch backend on CUDA (float32) against the Rust kernel on CPU (float64
     inputs) -- per-pair losses and gradients w.r.t. the policy log-probs;
  2. per-pair log-prob sums on CUDA agree across the padded, packed and prefix_shared layouts and
     with running each sequence alone;
  3. gradient accumulation on CUDA: 2 micro-batches of unequal size give the update of their union;
  4. DPO.fit on CUDA in each layout with bf16 autocast learns a planted preference, writes a
     checkpoint and resumes from it;
  5. a tiny Hugging Face GPT-2 with LoRA (peft) trains on CUDA with the adapters-off reference;
and times fit (steps/s, completion tokens/s) for each layout on the demo-sized model.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import rlox
from rlox import DPO, PreferenceDataset, sequence_logps
from rlox.losses import LOSS_TYPES, dpo_loss
from rlox.models import TinyCausalLM, TinyLMConfig

DEVICE = torch.device("cuda")
LAYOUTS = ("padded", "packed", "prefix_shared")
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def planted(n: int, vocab: int, seed: int) -> PreferenceDataset:
    """Chosen completions use even ids, rejected odd ones: a preference a model can learn."""
    rng = random.Random(seed)

    def row(lo: int, hi: int, parity: int | None) -> list[int]:
        k = rng.randint(lo, hi)
        if parity is None:
            return [rng.randrange(1, vocab) for _ in range(k)]
        return [2 * rng.randrange(1, vocab // 2) - parity for _ in range(k)]

    return PreferenceDataset.from_lists(
        [row(4, 24, None) for _ in range(n)],
        [row(4, 40, 0) for _ in range(n)],
        [row(4, 40, 1) for _ in range(n)],
    )


def losses() -> None:
    gen = torch.Generator().manual_seed(0)
    b = 4096
    base = {
        k: -torch.rand(b, generator=gen, dtype=torch.float64) * 50 for k in ("pc", "pr", "rc", "rr")
    }
    lengths = {
        "chosen_lengths": torch.randint(1, 300, (b,), generator=gen),
        "rejected_lengths": torch.randint(1, 300, (b,), generator=gen),
    }
    extra = {"exo_pair": {"label_smoothing": 0.1}}

    def run(loss_type: str, backend: str, device: torch.device | str, dtype: torch.dtype):
        pc = base["pc"].to(device, dtype, copy=True).requires_grad_(True)
        pr = base["pr"].to(device, dtype, copy=True).requires_grad_(True)
        res = dpo_loss(
            pc,
            pr,
            base["rc"].to(device, dtype),
            base["rr"].to(device, dtype),
            **{k: v.to(device) for k, v in lengths.items()},
            loss_type=loss_type,
            backend=backend,
            **extra.get(loss_type, {}),
        )
        res.loss.backward()
        grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (pc, pr)]
        return [t.detach().double().cpu() for t in (res.losses, *grads)]

    def error(a: list[torch.Tensor], c: list[torch.Tensor]) -> float:
        return max(
            float(((x - y).abs() / (1e-3 + y.abs())).max()) for x, y in zip(a, c, strict=True)
        )

    for loss_type in LOSS_TYPES:
        # float64 on the GPU against the Rust kernel; float32 on the GPU against float32 on CPU
        e64 = error(
            run(loss_type, "torch", DEVICE, torch.float64),
            run(loss_type, "rust", "cpu", torch.float64),
        )
        e32 = error(
            run(loss_type, "torch", DEVICE, torch.float32),
            run(loss_type, "torch", "cpu", torch.float32),
        )
        check(
            f"loss {loss_type}",
            e64 < 1e-9 and e32 < 1e-4,
            f"{DEVICE.type} float64 vs Rust {e64:.1e}; {DEVICE.type} float32 vs CPU float32 {e32:.1e}",
        )


def layouts() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = TinyCausalLM(TinyLMConfig(vocab_size=64, d_model=64, n_layers=2, max_seq_len=128))
    model = model.to(DEVICE).double().eval()
    ds = planted(48, 64, 1)
    idx = np.arange(len(ds))
    with torch.no_grad():
        sums = {
            layout: sequence_logps(model, ds.collate(idx, layout=layout)).cpu()
            for layout in LAYOUTS
        }
        alone = []
        for side in ("chosen", "rejected"):
            for i in range(len(ds)):
                row = ds[i]
                ids = torch.tensor(np.concatenate([row["prompt"], row[side]]), device=DEVICE)
                logp = model(ids[None]).log_softmax(-1)[0]
                p = len(row["prompt"])
                alone.append(float(logp[p - 1 : -1].gather(1, ids[p:, None]).sum()))
        alone_t = torch.tensor(alone, dtype=torch.float64)
    scale = float(alone_t.abs().max())
    for layout, s in sums.items():
        # sequence_logps returns float32 sums: allow its rounding (about 1e-7 of the largest sum)
        err = float((s.double() - alone_t).abs().max())
        check(
            f"log-prob sums {layout}",
            err < 1e-6 * scale,
            f"max |layout - alone| {err:.2e} (sums up to {scale:.0f}, float32 output)",
        )


def accumulation() -> None:
    torch.manual_seed(0)
    ds = planted(14, 64, 2)
    model = TinyCausalLM(TinyLMConfig(vocab_size=64, d_model=32, n_layers=1, max_seq_len=128))
    models = [copy.deepcopy(model).to(DEVICE).double() for _ in range(2)]
    refs = [copy.deepcopy(model).to(DEVICE).double() for _ in range(2)]
    opt = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    trainers = [
        DPO(m, r, optimizer=o, max_grad_norm=None)
        for m, r, o in zip(models, refs, opt, strict=True)
    ]
    union = np.arange(14)
    # one batch of 14 pairs, against 9 + 5 accumulated by hand with the n_i / N weights
    trainers[0].train_step(ds.collate(union))
    t = trainers[1]
    t.optimizer.zero_grad()
    for part in (union[:9], union[9:]):
        loss, _ = t._loss(ds.collate(part), training=True)
        (loss * len(part) / len(union)).backward()
    t.optimizer.step()
    err = max(
        float((a - b).detach().abs().max())
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True)
    )
    check("gradient accumulation 9+5 vs 14", err < 1e-6, f"max parameter difference {err:.2e}")


def fit_layouts(steps: int) -> None:
    for layout in LAYOUTS:
        torch.manual_seed(0)
        model = TinyCausalLM(TinyLMConfig(vocab_size=64, d_model=64, n_layers=2, max_seq_len=128))
        model = model.to(DEVICE)
        trainer = DPO(model, copy.deepcopy(model), learning_rate=3e-3)
        train, test = planted(512, 64, 3).train_test_split(64, seed=0)
        before = trainer.evaluate(test, batch_size=32, layout=layout)
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = trainer.fit(
                train, test, epochs=100, batch_size=32, layout=layout, mixed_precision="bf16",
                max_steps=steps, save_every=steps // 2, output_dir=out, progress=False,
                log_every=10,
            )  # fmt: skip
            after = res.eval
            resumed = DPO(model, copy.deepcopy(model), learning_rate=3e-3)
            res2 = resumed.fit(
                train, test, epochs=100, batch_size=32, layout=layout, mixed_precision="bf16",
                max_steps=steps + 4, save_every=steps // 2, output_dir=out, progress=False,
                resume_from="latest",
            )  # fmt: skip
        check(
            f"fit {layout} bf16 on {DEVICE.type}",
            after["reward_accuracy"] > max(0.9, before["reward_accuracy"])
            and res2.steps == steps + 4,
            f"eval accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
            f"loss {before['loss']:.4f} -> {after['loss']:.4f}; resumed to step {res2.steps}",
        )


def peft_gpt2() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=128, n_embd=64, n_layer=2, n_head=2)
    )
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["c_attn"], lora_alpha=16))
    model = model.to(DEVICE)
    trainer = DPO(model, None, learning_rate=1e-2)
    train, test = planted(256, 64, 4).train_test_split(64, seed=0)
    before = trainer.evaluate(test, batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = trainer.fit(train, test, batch_size=32, max_steps=30, progress=False)
    check(
        f"peft LoRA GPT-2 on {DEVICE.type}, reference = adapters off",
        res.eval["reward_accuracy"] > before["reward_accuracy"]
        and abs(before["reward_margin"]) < 1e-5,
        f"accuracy {before['reward_accuracy']:.3f} -> {res.eval['reward_accuracy']:.3f}, "
        f"margin before training {before['reward_margin']:.2e}",
    )


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def throughput(steps: int) -> None:
    from rlox.demo import DemoConfig

    cfg = DemoConfig()
    print(
        f"\nfit throughput on {device_name()}, 64 pairs/step, steps/s; 'first' is a first pass "
        "over the batches (attention kernels are planned once per new sequence length), "
        "'steady' the same batches again"
    )
    cols = ("fp32 steady", "bf16 first", "bf16 steady", "bf16 pad64 first", "bf16 tok/s")
    print(f"{'model':<26}{'layout':<15}" + "".join(f"{c:>18}" for c in cols))
    models = {
        "demo-sized TinyCausalLM": TinyLMConfig(
            vocab_size=64, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            max_seq_len=128,
        ),
        "TinyCausalLM d512 x 8": TinyLMConfig(
            vocab_size=64, d_model=512, n_layers=8, n_heads=8, max_seq_len=128
        ),
    }  # fmt: skip
    ds = planted(64 * steps, 64, 5)
    lengths = ds.lengths()
    tokens = float(lengths.chosen.sum() + lengths.rejected.sum())

    def rate(config: TinyLMConfig, layout: str, passes: int, **kw: object) -> float:
        torch.manual_seed(0)
        model = TinyCausalLM(config).to(DEVICE)
        trainer = DPO(model, copy.deepcopy(model))
        for _ in range(passes):
            sync()
            t0 = time.perf_counter()
            trainer.fit(ds, batch_size=64, layout=layout, progress=False, log_every=10**9, **kw)
            sync()
        return steps / (time.perf_counter() - t0)

    for name, config in models.items():
        for layout in LAYOUTS:
            row = [
                rate(config, layout, 2),
                rate(config, layout, 1, mixed_precision="bf16"),
                rate(config, layout, 2, mixed_precision="bf16"),
                rate(config, layout, 1, mixed_precision="bf16", pad_to_multiple_of=64),
            ]
            row.append(row[2] * tokens / steps)
            cells = "".join(f"{v:>18.1f}" for v in row[:4]) + f"{row[4]:>18,.0f}"
            print(f"{name:<26}{layout:<15}{cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_check: no CUDA device")
    print(f"rlox {rlox.__version__}, torch {torch.__version__}, {device_name()}", flush=True)
    for step in (losses, layouts, accumulation):
        step()
    fit_layouts(args.steps)
    peft_gpt2()
    throughput(args.steps)
    print(f"\n{len(FAILURES)} failed: {FAILURES}" if FAILURES else "\nall checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
