"""What guarding the reference cache costs: one weights hash per fit/evaluate call.

Usage: python benches/bench_digest.py [--threads 2] [--repeats 3]

``fit``, ``evaluate`` and ``precompute_reference`` hash the reference weights once per call
(``rlox.algorithms.dpo.weights_digest``: SHA-256 over names, dtypes, shapes and bytes) when a
cached entry exists to compare with. For Llama-shaped models of growing size (float32, random
weights) it prints, side by side:

- the hash of the whole model;
- one reference forward (no grad) over a padded batch of 8 pairs (16 rows x 256 tokens), what a cached
  reference saves per batch;
- their ratio: how many reference batches one hash costs.

Then what verifying a checkpoint file costs (``rlox.manifest.file_crc32``, Rust CRC-32 over a
memory map, as written and as checked before a resume) against Python's ``zlib.crc32`` over the
same bytes, for a 1 GiB file in the page cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import zlib

import torch

from rlox.algorithms.dpo import weights_digest
from rlox.manifest import file_crc32

SIZES = {  # name: (hidden, layers, intermediate, vocab)
    "60M": (512, 8, 1408, 32000),
    "250M": (1024, 12, 2816, 32000),
}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; min of {args.repeats}"
    )
    print(
        f"{'model':>6} {'params':>8} {'MiB':>7} {'hash s':>8} {'GiB/s':>6} "
        f"{'ref fwd s':>10} {'hash/fwd':>9}"
    )
    for name, (hidden, layers, inter, vocab) in SIZES.items():
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(config).eval().requires_grad_(False)
        n = sum(p.numel() for p in model.parameters())
        mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        hash_s = best(lambda m=model: weights_digest(m), args.repeats)
        ids = torch.randint(0, vocab, (16, 256))
        with torch.no_grad():
            fwd_s = best(lambda m=model, x=ids: m(x), args.repeats)
        print(
            f"{name:>6} {n / 1e6:7.1f}M {mib:7.0f} {hash_s:8.3f} {mib / 1024 / hash_s:6.2f} "
            f"{fwd_s:10.3f} {hash_s / fwd_s:8.2f}x"
        )
        del model
    checksum_cost(args.repeats)


def checksum_cost(repeats: int) -> None:
    size = 1 << 30
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        with open(path, "wb") as f:
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))

        def with_zlib() -> None:
            with open(path, "rb") as f:
                zlib.crc32(f.read())

        rust = best(lambda: file_crc32(path), repeats)
        plain = best(with_zlib, repeats)
    print(
        f"checksum of a 1 GiB file (page cache): rlox file_crc32 {rust:.3f} s, "
        f"zlib.crc32 {plain:.3f} s, ratio {plain / rust:.1f}x"
    )


if __name__ == "__main__":
    main()
