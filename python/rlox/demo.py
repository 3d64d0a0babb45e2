"""End-to-end DPO demo on a synthetic task with a known reward (``make demo``).

Task: the prompt is 4-7 distinct digits, the correct answer is the same digits
sorted ascending, followed by EOS::

    prompt = BOS 3 1 7 0 SEP    chosen   = 0 1 3 7 EOS
                                rejected = 7 3 1 0 EOS    (the demonstrator's bug)

The true reward is exact correctness, so success can be measured directly.

1. A tiny transformer is warmed up with supervised learning on noisy
   demonstrations: about half of them come from a buggy demonstrator that sorts
   descending. The warmed-up model sorts well but often in the wrong direction,
   so its greedy answers are mostly wrong.
2. A frozen copy becomes the DPO reference model.
3. DPO trains the policy on (correct, corrupted) pairs, where the corrupted
   answer is the descending bug or has one digit swapped, dropped or replaced.
4. On held-out prompts (a deterministic hash keeps them out of all training
   data) the script reports the reward accuracy and margin from
   ``DPO.compute_loss`` and the greedy task success of the policy against the
   reference.

Run ``python -m rlox.demo --help`` for options; ``--quick`` is a seconds-long
smoke run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlox import DPO
from rlox.models import TinyCausalLM, TinyLMConfig, generate_greedy

__all__ = [
    "BOS",
    "SEP",
    "EOS",
    "PAD",
    "VOCAB_SIZE",
    "DemoConfig",
    "QUICK_CONFIG",
    "is_held_out",
    "sample_digits",
    "correct_answer",
    "buggy_answer",
    "corrupt_answer",
    "encode_prompt",
    "make_task_batch",
    "make_sft_batch",
    "build_model",
    "sft_warmup",
    "dpo_train",
    "task_success",
    "evaluate",
    "run_demo",
    "format_report",
    "main",
]

BOS, SEP, EOS, PAD = 10, 11, 12, 13
VOCAB_SIZE = 14


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines a demo run.

    Prompts hold ``min_digits``..``max_digits`` distinct digits. The model is a
    :class:`~rlox.models.TinyCausalLM` of the given size. The warm-up sees
    correct answers with probability ``sft_correct_fraction`` (descending ones
    otherwise); DPO then runs ``dpo_steps`` steps of ``dpo_batch_size`` pairs.
    Both phases decay their learning rate with a cosine schedule. Evaluation
    uses ``eval_size`` held-out prompts.
    """

    seed: int = 0
    min_digits: int = 4
    max_digits: int = 7
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    sft_steps: int = 500
    sft_batch_size: int = 128
    sft_learning_rate: float = 3e-3
    sft_correct_fraction: float = 0.47
    dpo_steps: int = 300
    dpo_batch_size: int = 64
    dpo_learning_rate: float = 5e-4
    beta: float = 0.3
    eval_size: int = 1000


QUICK_CONFIG = DemoConfig(
    min_digits=3,
    max_digits=4,
    sft_steps=200,
    sft_batch_size=64,
    dpo_steps=80,
    dpo_batch_size=32,
    eval_size=200,
)
"""A seconds-long smoke configuration (shorter prompts, fewer steps) used by ``--quick`` and tests."""


def is_held_out(digits: Sequence[int]) -> bool:
    """Deterministic split: about one digit string in eight is reserved for evaluation."""
    key = 0
    for d in digits:
        key = (key * 31 + d + 1) % 1_000_003
    return key % 8 == 0


def sample_digits(
    rng: random.Random, min_digits: int = 4, max_digits: int = 7, held_out: bool = False
) -> list[int]:
    """Draw distinct digits in random order, from the training split or (``held_out``) the eval split."""
    if not 2 <= min_digits <= max_digits <= 10:
        raise ValueError(
            f"need 2 <= min_digits <= max_digits <= 10, got {min_digits}, {max_digits}"
        )
    while True:
        digits = rng.sample(range(10), rng.randint(min_digits, max_digits))
        if is_held_out(digits) == held_out:
            return digits


def correct_answer(digits: Sequence[int]) -> list[int]:
    """The reward-1 answer: the digits sorted ascending, then EOS."""
    return [*sorted(digits), EOS]


def buggy_answer(digits: Sequence[int]) -> list[int]:
    """The noisy demonstrator's systematic bug: the digits sorted *descending*, then EOS."""
    return [*sorted(digits, reverse=True), EOS]


def corrupt_answer(rng: random.Random, digits: Sequence[int]) -> list[int]:
    """A plausible but wrong answer to distinct ``digits`` (never equal to :func:`correct_answer`).

    Half of the time this is :func:`buggy_answer`; otherwise one digit of the
    sorted answer is swapped with its right neighbour, dropped, or replaced by
    a different digit.
    """
    if rng.random() < 0.5:
        return buggy_answer(digits)
    wrong = sorted(digits)
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(wrong) - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    elif kind == 1:
        del wrong[rng.randrange(len(wrong))]
    else:
        i = rng.randrange(len(wrong))
        wrong[i] = rng.choice([d for d in range(10) if d != wrong[i]])
    return [*wrong, EOS]


def encode_prompt(digits: Sequence[int]) -> list[int]:
    """``BOS d_1 ... d_n SEP``."""
    return [BOS, *digits, SEP]


def _pad(rows: Sequence[Sequence[int]], left: bool) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            values = torch.tensor(row, dtype=torch.long)
            if left:
                out[i, width - len(row) :] = values
            else:
                out[i, : len(row)] = values
    return out


def make_task_batch(
    rng: random.Random,
    batch_size: int,
    *,
    held_out: bool = False,
    min_digits: int = 4,
    max_digits: int = 7,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample preference pairs.

    Returns:
        ``prompt`` ``(B, P)`` left-padded with PAD, ``chosen`` ``(B, C)`` and
        ``rejected`` ``(B, R)`` right-padded with PAD; all int64.
    """
    prompts, chosen, rejected = [], [], []
    for _ in range(batch_size):
        digits = sample_digits(rng, min_digits, max_digits, held_out)
        prompts.append(encode_prompt(digits))
        chosen.append(correct_answer(digits))
        rejected.append(corrupt_answer(rng, digits))
    return _pad(prompts, left=True), _pad(chosen, left=False), _pad(rejected, left=False)


def make_sft_batch(
    rng: random.Random,
    batch_size: int,
    *,
    correct_fraction: float,
    min_digits: int = 4,
    max_digits: int = 7,
) -> tuple[Tensor, Tensor]:
    """Sample noisy demonstrations for the supervised warm-up.

    Each answer is correct with probability ``correct_fraction`` and otherwise
    the buggy demonstrator's :func:`buggy_answer`.

    Returns:
        ``input_ids`` ``(B, T)`` (prompt then answer, right-padded with PAD) and
        ``labels`` ``(B, T)``: the next token to predict, ``-100`` except where
        the next token belongs to the answer.
    """
    rows, labels = [], []
    for _ in range(batch_size):
        digits = sample_digits(rng, min_digits, max_digits)
        answer = correct_answer(digits) if rng.random() < correct_fraction else buggy_answer(digits)
        prompt = encode_prompt(digits)
        rows.append(prompt + answer)
        labels.append([-100] * (len(prompt) - 1) + answer + [-100])
    input_ids = _pad(rows, left=False)
    label_ids = _pad(labels, left=False)
    label_ids[label_ids == PAD] = -100
    return input_ids, label_ids


def build_model(config: DemoConfig) -> TinyCausalLM:
    """The demo's policy, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    return TinyCausalLM(
        TinyLMConfig(
            vocab_size=VOCAB_SIZE,
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            max_seq_len=2 * config.max_digits + 4,
        )
    )


def _cosine_schedule(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every parameter group's learning rate to 0 over ``steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    )


def sft_warmup(
    model: nn.Module, rng: random.Random, config: DemoConfig, progress: bool = True
) -> float:
    """Supervised warm-up on noisy demonstrations (AdamW, cosine decay); returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_learning_rate, weight_decay=0.0)
    schedule = _cosine_schedule(optimizer, config.sft_steps)
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(config.sft_steps), desc="SFT warm-up", disable=not progress)
    for _ in bar:
        input_ids, labels = make_sft_batch(
            rng,
            config.sft_batch_size,
            correct_fraction=config.sft_correct_fraction,
            min_digits=config.min_digits,
            max_digits=config.max_digits,
        )
        logits = model(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return float(loss.item())


def dpo_train(
    trainer: DPO, rng: random.Random, config: DemoConfig, progress: bool = True
) -> list[dict]:
    """``config.dpo_steps`` DPO steps on fresh training pairs, cosine-decaying the trainer's learning rate.

    Returns:
        The metrics dict of every step.
    """
    schedule = _cosine_schedule(trainer.optimizer, config.dpo_steps)
    history: list[dict] = []
    bar = tqdm(range(config.dpo_steps), desc="DPO", disable=not progress)
    for _ in bar:
        prompt, chosen, rejected = make_task_batch(
            rng,
            config.dpo_batch_size,
            min_digits=config.min_digits,
            max_digits=config.max_digits,
        )
        metrics = trainer.train_step(prompt=prompt, chosen=chosen, rejected=rejected)
        schedule.step()
        history.append(metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            acc=f"{metrics['reward_accuracy']:.2f}",
            margin=f"{metrics['reward_margin']:.2f}",
        )
    trainer.model.eval()
    return history


@torch.no_grad()
def task_success(model: nn.Module, prompts: Tensor) -> float:
    """Fraction of prompts whose greedy completion is exactly the sorted digits plus EOS.

    Args:
        model: any causal LM called as ``model(input_ids)``.
        prompts: ``(N, P)`` int64 prompts as made by :func:`make_task_batch`
            (``BOS digits SEP``, left-padded with PAD).
    """
    rows = [[t for t in row if t != PAD] for row in prompts.tolist()]
    by_length: dict[int, list[list[int]]] = {}
    for row in rows:
        by_length.setdefault(len(row), []).append(row)
    was_training = model.training
    model.eval()
    solved = 0
    for length, group in by_length.items():
        targets = [correct_answer(row[1:-1]) for row in group]
        width = length - 1
        generated = generate_greedy(model, torch.tensor(group), width, eos_token_id=EOS).tolist()
        solved += sum(out[: len(t)] == t for out, t in zip(generated, targets, strict=True))
    model.train(was_training)
    return solved / max(len(rows), 1)


def evaluate(
    trainer: DPO,
    policy: nn.Module,
    reference: nn.Module,
    eval_batch: tuple[Tensor, Tensor, Tensor],
) -> dict[str, float]:
    """Held-out DPO metrics of ``trainer``'s policy plus greedy success of policy and reference."""
    prompt, chosen, rejected = eval_batch
    metrics = trainer.compute_loss(prompt=prompt, chosen=chosen, rejected=rejected)
    return {
        "reward_accuracy": metrics["reward_accuracy"],
        "reward_margin": metrics["reward_margin"],
        "chosen_logps": metrics["chosen_logps"],
        "rejected_logps": metrics["rejected_logps"],
        "policy_success": task_success(policy, prompt),
        "reference_success": task_success(reference, prompt),
    }


def run_demo(
    config: DemoConfig | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict:
    """Run warm-up, DPO and held-out evaluation.

    Args:
        config: full configuration; defaults to :class:`DemoConfig` (or the
            seconds-long ``QUICK_CONFIG`` with ``quick=True``).
        quick: use the smoke-test configuration.
        progress: show tqdm progress bars.
        **overrides: fields of :class:`DemoConfig` to replace, e.g. ``seed=1``.

    Returns:
        ``{"config": dict, "before": dict, "after": dict, "train": dict, "seconds": float}``;
        ``before`` / ``after`` hold :func:`evaluate`'s numbers.
    """
    config = replace(config or (QUICK_CONFIG if quick else DemoConfig()), **overrides)
    start = time.perf_counter()
    rng = random.Random(config.seed)
    eval_batch = make_task_batch(
        random.Random(config.seed + 10_000),
        config.eval_size,
        held_out=True,
        min_digits=config.min_digits,
        max_digits=config.max_digits,
    )

    policy = build_model(config)
    sft_loss = sft_warmup(policy, rng, config, progress)
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)

    trainer = DPO(
        model=policy,
        ref_model=reference,
        beta=config.beta,
        learning_rate=config.dpo_learning_rate,
        max_grad_norm=1.0,
        loss_type="sigmoid",
        pad_token_id=PAD,
    )
    before = evaluate(trainer, policy, reference, eval_batch)

    history = dpo_train(trainer, rng, config, progress)
    after = evaluate(trainer, policy, reference, eval_batch)
    return {
        "config": asdict(config),
        "before": before,
        "after": after,
        "train": {"sft_loss": sft_loss, "dpo_final": history[-1] if history else {}},
        "seconds": time.perf_counter() - start,
    }


def format_report(result: dict) -> str:
    """A before/after table of :func:`run_demo`'s result."""
    before, after = result["before"], result["after"]
    n = result["config"]["eval_size"]
    rows = [
        ("reward accuracy (DPO, held-out pairs)", "reward_accuracy", "{:.1%}"),
        ("mean reward margin", "reward_margin", "{:+.3f}"),
        ("mean log p(chosen)", "chosen_logps", "{:.3f}"),
        ("mean log p(rejected)", "rejected_logps", "{:.3f}"),
        ("greedy task success, policy", "policy_success", "{:.1%}"),
        ("greedy task success, reference", "reference_success", "{:.1%}"),
    ]
    lines = [
        f"Held-out evaluation on {n} unseen prompts (reward = exact sort):",
        f"{'metric':<40}{'before DPO':>12}{'after DPO':>12}",
        "-" * 64,
    ]
    for label, key, fmt in rows:
        lines.append(f"{label:<40}{fmt.format(before[key]):>12}{fmt.format(after[key]):>12}")
    lines.append("-" * 64)
    lines.append("Before DPO the policy is the reference, so every implicit reward is 0.")
    lines.append(
        f"Task success: {before['policy_success']:.1%} -> {after['policy_success']:.1%} "
        f"in {result['seconds']:.1f} s"
    )
    return "\n".join(lines)


DESCRIPTION = "DPO on a synthetic digit-sorting task with a known reward."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python -m rlox.demo`` and ``rlox demo``)."""
    parser.add_argument("--seed", type=int, default=DemoConfig.seed, help="random seed")
    parser.add_argument("--steps", type=int, default=None, help="DPO steps")
    parser.add_argument("--sft-steps", type=int, default=None, help="supervised warm-up steps")
    parser.add_argument("--batch-size", type=int, default=None, help="DPO batch size")
    parser.add_argument("--lr", type=float, default=None, help="DPO learning rate")
    parser.add_argument("--beta", type=float, default=None, help="DPO beta")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``python -m rlox.demo``."""
    parser = argparse.ArgumentParser(prog="python -m rlox.demo", description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo with parsed :func:`add_arguments` options and print the report."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    overrides = {
        key: value
        for key, value in {
            "seed": args.seed,
            "dpo_steps": args.steps,
            "sft_steps": args.sft_steps,
            "dpo_batch_size": args.batch_size,
            "dpo_learning_rate": args.lr,
            "beta": args.beta,
        }.items()
        if value is not None
    }
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        result = run_demo(quick=args.quick, progress=not args.no_progress, **overrides)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
