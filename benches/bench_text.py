"""rlox.text.tokenize_preferences: time spent outside the tokenizer's own encode calls.

Usage: python benches/bench_text.py [--pairs 20000] [--repeats 5] [--source list|jsonl|parquet]
                                    [--format standard|conversational] [--batch-size 1024]

Trains a byte-level BPE tokenizer locally on English text (the standard library's docstrings),
generates UltraFeedback-like records from a word bigram model of that text (prompt ~70 tokens,
responses ~170 tokens), then times ``tokenize_preferences`` against the bare batch-encode calls on
the same texts with the same batch size: rlox's Rust encoder (the ``tokenizers`` crate, what
``tokenize_preferences`` runs) and, for comparison, the ``tokenizers`` Python package's
``encode_batch_fast`` plus reading its ids. The difference between ``tokenize_preferences`` and the
Rust encode calls (reading, rendering chat templates, prefix checks, assembling columns) is
reported as a share of the total.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rlox._rlox import TokenEncoder
from rlox.text import TokenizedPairs, tokenize_preferences

MODULES = (
    "argparse asyncio collections concurrent.futures contextlib csv dataclasses datetime decimal "
    "email functools http.client inspect io itertools json logging multiprocessing os pathlib "
    "pickle random re shutil socket sqlite3 statistics string subprocess tarfile threading typing "
    "unittest urllib.request zipfile difflib textwrap heapq fractions enum abc ast tokenize pdb "
    "doctest optparse imaplib smtplib mailbox configparser calendar locale gettext codecs struct "
    "queue sched selectors ssl hashlib secrets uuid base64 gzip bz2 lzma"
).split()


def docstrings() -> list[str]:
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            module = importlib.import_module(name)
            docs.append(inspect.getdoc(module) or "")
            for obj in vars(module).values():
                if inspect.isclass(obj) or inspect.isroutine(obj):
                    docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if d]


class Babbler:
    """Word bigram model of a corpus: fluent-looking English-like text of a given word count."""

    def __init__(self, corpus: list[str], seed: int) -> None:
        self.words = re.findall(r"[A-Za-z']+|[.,;:!?()]", " ".join(corpus))
        self.next: dict[str, list[str]] = collections.defaultdict(list)
        for a, b in zip(self.words, self.words[1:], strict=False):
            self.next[a].append(b)
        self.rng = random.Random(seed)

    def __call__(self, n_words: int) -> str:
        word = self.rng.choice(self.words)
        out = [word]
        for _ in range(n_words - 1):
            word = self.rng.choice(self.next.get(word) or self.words)
            out.append(word)
        return re.sub(r" ([.,;:!?)])", r"\1", " ".join(out))


def train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def make_records(babble: Babbler, n: int, conversational: bool) -> list[dict]:
    def length(mean: int) -> int:
        return max(3, int(babble.rng.gauss(mean, mean / 3)))

    records = []
    for _ in range(n):
        prompt, chosen, rejected = babble(length(66)), babble(length(160)), babble(length(160))
        if conversational:
            user = [{"role": "user", "content": prompt}]
            records.append(
                {
                    "chosen": user + [{"role": "assistant", "content": chosen}],
                    "rejected": user + [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            records.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return records


def encode_texts(records: list[dict], tokenizer, conversational: bool) -> list[str]:
    """The texts tokenize_preferences encodes: prompts, prompt + chosen, prompt + rejected."""
    if not conversational:
        p = [r["prompt"] for r in records]
        return (
            p
            + [a + r["chosen"] for a, r in zip(p, records, strict=True)]
            + [a + r["rejected"] for a, r in zip(p, records, strict=True)]
        )
    prompts = tokenizer.apply_chat_template(
        [r["chosen"][:1] for r in records], tokenize=False, add_generation_prompt=True
    )
    full = [
        tokenizer.apply_chat_template([r[k] for r in records], tokenize=False)
        for k in ("chosen", "rejected")
    ]
    return prompts + full[0] + full[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16_000)
    parser.add_argument("--source", choices=("list", "jsonl", "parquet"), default="list")
    parser.add_argument("--format", choices=("standard", "conversational"), default="standard")
    args = parser.parse_args()
    conversational = args.format == "conversational"

    corpus = docstrings()
    raw = train_tokenizer(corpus, args.vocab)
    tokenizer: object = raw
    if conversational:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
        tokenizer.chat_template = (
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
    backend = tokenizer.backend_tokenizer if conversational else raw
    records = make_records(Babbler(corpus, seed=0), args.pairs, conversational)

    with tempfile.TemporaryDirectory() as tmp:
        source: object = records
        if args.source == "jsonl":
            source = os.path.join(tmp, "pairs.jsonl")
            with open(source, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        elif args.source == "parquet":
            source = os.path.join(tmp, "pairs.parquet")
            pq.write_table(pa.Table.from_pylist(records), source)

        bs = args.batch_size
        texts = encode_texts(records, tokenizer, conversational)
        n = args.pairs
        batches = [
            texts[i : i + bs] + texts[n + i : n + i + bs] + texts[2 * n + i : 2 * n + i + bs]
            for i in range(0, n, bs)
        ]

        encoder = TokenEncoder(backend.to_str())

        def encode_only() -> None:
            for batch in batches:
                encoder.encode(batch)

        def encode_python() -> None:
            for batch in batches:
                ids = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
                np.fromiter((t for row in ids for t in row), np.int32)

        def tokenize() -> TokenizedPairs:
            return tokenize_preferences(source, tokenizer, batch_size=bs)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = tokenize()
            timings: dict[str, list[tuple[float, float, float]]] = {
                "encode": [],
                "total": [],
                "python": [],
            }
            for _ in range(args.repeats):
                for key, fn in (
                    ("encode", encode_only),
                    ("total", tokenize),
                    ("python", encode_python),
                ):
                    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                    fn()
                    timings[key].append(
                        (
                            time.perf_counter() - t0,
                            time.thread_time() - c0,
                            time.process_time() - p0,
                        )
                    )

    tokens = [
        np.diff(getattr(out, f"{k}_offsets")).mean() for k in ("prompt", "chosen", "rejected")
    ]
    print(
        f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; "
        f"{n} pairs ({args.format}, from {args.source}, batch size {bs}); mean tokens "
        f"prompt/chosen/rejected {tokens[0]:.0f}/{tokens[1]:.0f}/{tokens[2]:.0f}; "
        f"non-prefix rows {out.non_prefix_prompts}"
    )
    for label, pick in (("min", min), ("median", statistics.median)):
        enc, tot = (pick(t[0] for t in timings[k]) for k in ("encode", "total"))
        print(
            f"wall {label:>6}: encode calls {enc:.3f} s, tokenize_preferences {tot:.3f} s, "
            f"outside encode {tot - enc:.3f} s = {100 * (tot - enc) / tot:.1f}% of total"
        )
    py = min(t[0] for t in timings["python"])
    enc = min(t[0] for t in timings["encode"])
    print(
        f"wall    min: tokenizers Python package encode_batch_fast + ids {py:.3f} s = "
        f"{py / enc:.2f}x rlox's Rust encode calls"
    )
    main = min(t[1] for t in timings["total"]) - min(t[1] for t in timings["encode"])
    enc_cpu, tot_cpu = (min(t[2] for t in timings[k]) for k in ("encode", "total"))
    print(
        f"cpu    min: encode calls {enc_cpu:.3f} s (all threads), tokenize_preferences "
        f"{tot_cpu:.3f} s; Python-thread work outside encode {main:.3f} s = "
        f"{100 * main / (enc_cpu + main):.1f}% of encode + that work"
    )


if __name__ == "__main__":
    main()
