"""TRL's ``DPOTrainer`` as an outside oracle for rlox's DPO (see tests/test_trl_parity.py).

Everything is local and on the CPU: a tiny float32 GPT-2 built from a config, the BPE tokenizer
trained by :mod:`tiny_hf`, in-memory ``datasets.Dataset`` text. TRL 1.16 does not take
pre-tokenized data (``DPOTrainer._prepare_dataset`` always extracts, appends EOS and tokenizes
the ``prompt`` / ``chosen`` / ``rejected`` text), so TRL tokenizes the text and rlox is given
the ids TRL produced: ``prompt_ids`` (the tokenizer's ids of the prompt, no BOS with this
tokenizer) and ``chosen_ids`` / ``rejected_ids`` (the completion ids INCLUDING the EOS token TRL
appends to the text).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tiny_hf import WORDS  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from rlox import DPO  # noqa: E402

datasets.disable_progress_bars()

TRL_TO_RLOX = {"f_divergence_type": "f_divergence"}
"""TRL option names that rlox spells differently; every other option has the same name."""

Example = dict[str, list[int]]


# ---------------------------------------------------------------------- models and data
def make_models(tokenizer: Any, *, noise: float = 0.02, seed: int = 0) -> tuple[Any, Any]:
    """(policy, reference): a tiny float32 GPT-2 without dropout, and the policy = reference plus
    deterministic Gaussian noise of std ``noise`` on every weight, so that losses are not trivial.
    """
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ref = transformers.GPT2LMHeadModel(cfg).float().eval()
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return policy, ref


def set_dropout(model: torch.nn.Module, p: float) -> torch.nn.Module:
    """Set every ``nn.Dropout`` of ``model`` (and the config's rates) to ``p``; return it."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, name, p)
    return model


def pair_texts(n: int, seed: int = 0) -> dict[str, list[str]]:
    """``n`` text preference pairs of unequal lengths; completions start with a space so that
    prompt + completion tokenizes as prompt followed by completion."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        prompts.append(words(2, 5) + "?")
        chosen.append(" " + words(1, 5) + ".")
        rejected.append(" " + words(1, 5) + ".")
    return {"prompt": prompts, "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------- TRL
def trl_args(output_dir: str, batch_size: int, **options: Any) -> DPOConfig:
    """A CPU, float32, no-dropout, no-shuffle ``DPOConfig`` with TRL option names ``options``."""
    base: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        bf16=False,
        fp16=False,
        disable_dropout=True,
        per_device_train_batch_size=batch_size,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    # TRL turns gradient checkpointing on by default; recent transformers renamed the option.
    if "activation_checkpointing" in names:
        base["activation_checkpointing"] = False
    else:
        base["gradient_checkpointing"] = False
    if "train_sampling_strategy" in names:  # also RecordingDPOTrainer._get_train_sampler
        base["train_sampling_strategy"] = "sequential"
    base.update(options)
    return DPOConfig(**base)


class RecordingDPOTrainer(DPOTrainer):
    """``DPOTrainer`` that keeps the data in order and records the loss of every training
    forward as a float (the logged loss is an average over the logging window)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def _get_train_sampler(self, train_dataset=None):
        # The pairs in dataset order, as rlox is given them.
        return torch.utils.data.SequentialSampler(
            self.train_dataset if train_dataset is None else train_dataset
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = out[0] if return_outputs else out
            self.step_losses.append(float(loss.detach()))
        return out


@contextlib.contextmanager
def trl_trainer(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    texts: dict[str, list[str]],
    output_dir: str,
    batch_size: int,
    **options: Any,
) -> Iterator[RecordingDPOTrainer]:
    """A ``DPOTrainer`` over ``texts``; on exit the models' forwards lose TRL's fused LM head."""
    saved = {id(m): m.__dict__.get("forward") for m in (policy, ref)}
    trainer = RecordingDPOTrainer(
        model=policy,
        ref_model=ref,
        args=trl_args(output_dir, batch_size, **options),
        train_dataset=datasets.Dataset.from_dict(texts),
        processing_class=tokenizer,
    )
    try:
        yield trainer
    finally:
        for m in (policy, ref):
            # add_fused_lm_head replaces the instance's forward; put the class's back
            if saved[id(m)] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = saved[id(m)]


def trl_examples(trainer: DPOTrainer) -> list[Example]:
    """The token ids TRL built for each pair: prompt_ids, chosen_ids, rejected_ids."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{k: list(row[k]) for k in keys} for row in trainer.train_dataset]


def trl_batch_loss(trainer: DPOTrainer) -> float:
    """TRL's loss on the first batch of its train dataloader (its collator, no update)."""
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    return float(loss)


# ---------------------------------------------------------------------- rlox
def rlox_options(trl_options: dict[str, Any]) -> dict[str, Any]:
    """TRL option names -> rlox ``DPO`` keyword names."""
    return {TRL_TO_RLOX.get(k, k): v for k, v in trl_options.items()}


def id_matrices(examples: Sequence[Example], pad: int) -> tuple[torch.Tensor, ...]:
    """(B, P) left-padded prompts and (B, C), (B, R) right-padded completions."""

    def matrix(rows: list[list[int]], left: bool) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if left:
                out[i, width - len(r) :] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
        return out

    return (
        matrix([e["prompt_ids"] for e in examples], left=True),
        matrix([e["chosen_ids"] for e in examples], left=False),
        matrix([e["rejected_ids"] for e in examples], left=False),
    )


def rlox_batch_loss(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    examples: Sequence[Example],
    pad: int,
    **trl_options: Any,
) -> float:
    """rlox's loss on ``examples`` as one batch (``DPO.compute_loss``, no update)."""
    trainer = DPO(policy, ref, pad_token_id=pad, **rlox_options(trl_options))
    p, c, r = id_matrices(examples, pad)
    return float(trainer.compute_loss(prompt=p, chosen=c, rejected=r)["loss"])


# ---------------------------------------------------------------------- training trajectories
def trl_trajectory(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    texts: dict[str, list[str]],
    output_dir: str,
    batch_size: int,
    *,
    learning_rate: float,
    epochs: int = 1,
    **options: Any,
) -> tuple[list[float], list[Example], dict[str, Any]]:
    """Train copies of the models with TRL (AdamW, constant lr, clip 1.0, data in order).

    Returns the loss of every step, TRL's token ids and the optimizer's hyper-parameters.
    """
    policy, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    with trl_trainer(
        policy,
        ref,
        tokenizer,
        texts,
        output_dir,
        batch_size,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        gradient_accumulation_steps=1,
        **options,
    ) as trainer:
        trainer.train()
        group = trainer.optimizer.param_groups[0]
        hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
        return trainer.step_losses, trl_examples(trainer), hyper


def rlox_step_trajectory(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    examples: Sequence[Example],
    pad: int,
    batch_size: int,
    *,
    learning_rate: float,
    **trl_options: Any,
) -> tuple[list[float], dict[str, Any]]:
    """``DPO.train_step`` on consecutive batches of ``examples`` with ``torch.optim.AdamW``."""
    policy, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    trainer = DPO(
        policy,
        ref,
        learning_rate=learning_rate,
        max_grad_norm=1.0,
        pad_token_id=pad,
        optimizer=opt,
        **rlox_options(trl_options),
    )
    losses = []
    for start in range(0, len(examples), batch_size):
        p, c, r = id_matrices(examples[start : start + batch_size], pad)
        losses.append(trainer.train_step(p, c, r)["loss"])
    group = opt.param_groups[0]
    hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    return losses, hyper


def rlox_fit_trajectory(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    examples: Sequence[Example],
    pad: int,
    batch_size: int,
    *,
    learning_rate: float,
    epochs: int,
    **trl_options: Any,
) -> list[float]:
    """``DPO.fit`` (its default optimizer, constant lr, no weight decay) over ``examples``."""
    from rlox import PreferenceDataset

    policy, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    data = PreferenceDataset.from_lists(
        [e["prompt_ids"] for e in examples],
        [e["chosen_ids"] for e in examples],
        [e["rejected_ids"] for e in examples],
    )
    trainer = DPO(
        policy,
        ref,
        learning_rate=learning_rate,
        max_grad_norm=1.0,
        pad_token_id=pad,
        **rlox_options(trl_options),
    )
    losses: list[float] = []
    trainer.fit(
        data,
        batch_size=batch_size,
        epochs=epochs,
        weight_decay=0.0,
        lr_scheduler="constant",
        warmup_steps=0,
        log_every=None,
        progress=False,
        callback=lambda step, metrics: losses.append(metrics["loss"]),
    )
    return losses
