"""Training-step contenders shared by bench_train.py and gpu_check.py: rlox and TRL's DPOTrainer.

Both contenders get the same tiny Llama built from a config (same seed, so the same weights),
the same synthetic preference pairs (lognormal lengths), the same hyper-parameters (``batch``
pairs per step, ``max_length``, AdamW at a constant ``lr``, clip 1.0, beta 0.1, no dropout) and
run one epoch of ``steps`` optimizer steps. Each contender runs in its own process
(``run_contender``), so its peak RSS and peak CUDA memory are its own.

Work of a step ("tokens"): for each pair, min(P + C, L) + min(P + R, L), the real tokens of the
chosen and rejected sequences after truncation to L = max_length, whatever the layout. TRL gets
text over a word-level tokenizer whose word ``t<i>`` is id i, so it tokenizes to exactly these
ids (checked in the child); completions end with the EOS id, so TRL appends none.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROFILES = {"ultrafeedback": (70, 170), "hh": (100, 45)}  # median prompt, median response
SIGMA, CAP = 0.7, 2048
PAD, EOS, FIRST_ID = 0, 1, 2
RLOX_OPTIONS = ("attention", "logits_chunk_size", "gradient_checkpointing", "compile")


@dataclass
class Setup:
    """One workload: model config, data profile and hyper-parameters (JSON for the child)."""

    profile: str = "ultrafeedback"
    vocab: int = 32000
    hidden: int = 256
    layers: int = 4
    heads: int = 0  # 0: hidden // 64 (at least 1)
    kv_heads: int = 0  # 0: heads
    intermediate: int = 0  # 0: 8/3 hidden, rounded up to 32
    tie_embeddings: bool = False
    max_length: int = 512
    batch: int = 8
    steps: int = 12
    warmup: int = 2
    lr: float = 5e-6
    device: str = "cpu"
    dtype: str = "float32"  # "bf16": autocast (weights stay float32) in both contenders
    threads: int = 1
    seed: int = 0
    fused_adamw: bool = False  # AdamW(fused=True) in rlox; "adamw_torch_fused" in TRL like-for-like

    def llama_config(self) -> Any:
        import transformers

        heads = self.heads or max(1, self.hidden // 64)
        return transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate or -(-self.hidden * 8 // 3 // 32) * 32,
            num_hidden_layers=self.layers,
            num_attention_heads=heads,
            num_key_value_heads=self.kv_heads or heads,
            max_position_embeddings=max(self.max_length, 2048),
            tie_word_embeddings=self.tie_embeddings,
            attention_dropout=0.0,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=EOS,
        )


def param_count(s: Setup) -> int:
    """Parameters of ``s.llama_config()`` (embedding, decoder, norms and LM head)."""
    c = s.llama_config()
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    head_dim = h // c.num_attention_heads
    attn = h * h * 2 + 2 * h * c.num_key_value_heads * head_dim
    layer = attn + 3 * h * i + 2 * h
    return v * h * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer + h


def make_pairs(s: Setup) -> list[tuple[list[int], list[int], list[int]]]:
    """``steps * batch`` pairs; prompts shorter than max_length; completions end with EOS."""
    rng = np.random.default_rng(s.seed)
    prompt_median, response_median = PROFILES[s.profile]
    pairs: list[tuple[list[int], list[int], list[int]]] = []
    while len(pairs) < s.steps * s.batch:
        lens = np.clip(
            np.rint(rng.lognormal(np.log([prompt_median] + [response_median] * 2), SIGMA)), 1, CAP
        )
        p, c, r = (rng.integers(FIRST_ID, s.vocab, int(n)).tolist() for n in lens)
        if len(p) < s.max_length:  # TRL drops pairs whose prompt fills max_length
            pairs.append((p, c[:-1] + [EOS], r[:-1] + [EOS]))
    return pairs


def pair_tokens(pair: tuple[list[int], ...], max_length: int) -> int:
    p, c, r = (len(x) for x in pair)
    return min(p + c, max_length) + min(p + r, max_length)


def make_models(s: Setup) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, reference): the same float32 Llama weights on ``s.device``."""
    import transformers

    torch.manual_seed(s.seed)
    config = s.llama_config()
    config._attn_implementation = "sdpa"
    with torch.device(s.device):  # initialised where it runs (fast for large models on CUDA)
        policy = transformers.LlamaForCausalLM(config).float()
    return policy, copy.deepcopy(policy).eval()


def supported_options(names: tuple[str, ...] = RLOX_OPTIONS) -> dict[str, bool]:
    """Which of ``names`` ``rlox.DPO`` (or ``DPO.fit``) accepts as keywords."""
    import rlox

    params = set(inspect.signature(rlox.DPO).parameters) | set(
        inspect.signature(rlox.DPO.fit).parameters
    )
    return {n: n in params for n in names}


# ---------------------------------------------------------------------------- contenders
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_rlox(
    s: Setup, layout: str, options: dict[str, Any]
) -> tuple[list[float], list[int], float, int]:
    """``DPO.fit`` for one epoch in ``layout``: (step end times, step tokens, start time, RSS KiB at start)."""
    import rlox

    policy, ref = make_models(s)
    pairs = make_pairs(s)
    data = rlox.PreferenceDataset.from_lists(*(list(col) for col in zip(*pairs, strict=True)))
    sig = set(inspect.signature(rlox.DPO).parameters)
    init_opts = {k: v for k, v in options.items() if k in sig}
    fit_opts = {k: v for k, v in options.items() if k not in sig}
    fused = {"fused": True} if s.fused_adamw else {}
    opt = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0, **fused)
    trainer = rlox.DPO(
        policy, ref, beta=0.1, max_grad_norm=1.0, pad_token_id=PAD, optimizer=opt, **init_opts
    )
    tokens: list[int] = []
    collate = data.collate

    def recording_collate(idx: Any, **kw: Any) -> Any:  # one batch per step (no accumulation)
        tokens.append(sum(pair_tokens(pairs[int(i)], s.max_length) for i in idx))
        return collate(idx, **kw)

    data.collate = recording_collate
    times: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        _sync(s.device)
        times.append(time.perf_counter())

    rss, start = rss_kib(), time.perf_counter()
    trainer.fit(
        data,
        batch_size=s.batch,
        layout=layout,
        max_length=s.max_length,
        mixed_precision="bf16" if s.dtype == "bf16" else None,
        lr_scheduler="constant",
        log_every=None,
        progress=False,
        callback=on_step,
        **fit_opts,
    )
    return times, tokens, start, rss


def run_trl(
    s: Setup, bf16: bool, checkpointing: bool, default_optim: bool = False
) -> tuple[list[float], list[int], float, int]:
    """TRL's ``DPOTrainer.train`` for one epoch: (step end times, step tokens, start time, RSS KiB
    at start). ``default_optim``: TRL's own optimizer choice instead of rlox's AdamW."""
    import datasets
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    words = {"<pad>": PAD, "</s>": EOS} | {f"t{i}": i for i in range(FIRST_ID, s.vocab)}
    raw = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", pad_token="<pad>"
    )
    pairs = make_pairs(s)

    def text(ids: list[int]) -> str:
        return " ".join(words_of[i] for i in ids)

    words_of = {i: w for w, i in words.items()}
    texts = {
        "prompt": [text(p) for p, _, _ in pairs],
        "chosen": [" " + text(c) for _, c, _ in pairs],
        "rejected": [" " + text(r) for _, _, r in pairs],
    }
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rlox-bench-trl-"),
        use_cpu=s.device == "cpu",
        report_to="none",
        bf16=bf16,
        fp16=False,
        **{ckpt: checkpointing},
        per_device_train_batch_size=s.batch,
        max_length=s.max_length,
        learning_rate=s.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=s.steps,
        beta=0.1,
        disable_dropout=True,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=s.seed,
        **(
            {}
            if default_optim
            else {"optim": "adamw_torch_fused" if s.fused_adamw else "adamw_torch"}
        ),
    )
    tokens: list[int] = []
    times: list[float] = []

    class Timed(transformers.TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            _sync(s.device)
            times.append(time.perf_counter())

    class Counting(DPOTrainer):
        def training_step(
            self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any
        ) -> Any:
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    policy, ref = make_models(s)
    trainer = Counting(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_dict(texts),
        processing_class=tok,
        callbacks=[Timed()],
    )
    for row, (p, c, r) in zip(trainer.train_dataset.select(range(4)), pairs[:4], strict=True):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (p, c, r):
            raise RuntimeError("TRL tokenized the synthetic pairs to different ids")
    rss, start = rss_kib(), time.perf_counter()
    trainer.train()
    if bool(getattr(policy, "is_gradient_checkpointing", False)) != checkpointing:
        raise RuntimeError(f"TRL gradient checkpointing is not {checkpointing}")
    return times, tokens, start, rss


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender in this process; its timings and memory."""
    s = Setup(**spec["setup"])
    torch.set_num_threads(s.threads)
    if spec["contender"] == "trl":
        times, tokens, start, rss = run_trl(
            s, spec["bf16"], spec["checkpointing"], spec.get("default_optim", False)
        )
    else:
        times, tokens, start, rss = run_rlox(s, spec["layout"], spec.get("options", {}))
    if len(times) != s.steps or len(tokens) != s.steps:
        raise RuntimeError(f"expected {s.steps} steps, timed {len(times)}, counted {len(tokens)}")
    w = s.warmup
    span = times[-1] - times[w - 1]
    out = {
        "tokens_per_s": sum(tokens[w:]) / span,
        "steps_per_s": (s.steps - w) / span,
        "warmup_s": times[w - 1] - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_mib": rss / 1024,  # RSS when training starts
    }
    if s.device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_contender(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """``child(spec)`` in a fresh Python process; {"error": ...} if it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):
        result = child(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
