"""Every decoder-only causal LM of the installed transformers, in every layout: exact or refused.

The oracle knows nothing of rlox: each sequence runs alone through the model's own forward,
``log_softmax(model(ids).logits)`` is summed over its completion tokens, and the DPO loss of
those sums is back-propagated. One rlox step with SGD(lr=1) and no clipping must move every
weight by exactly minus that gradient, and report the same log-probs, whatever route the probe
picks. Models come from :mod:`zoo` (tiny configs, built once per session).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import zoo

from rlox import DPO, PreferenceDataset
from rlox.train import probe
from rlox.train.logps import accepted_kwargs, sequence_stats

LAYOUTS = ("padded", "packed", "prefix_shared")
# (the model's attn_implementation, rlox's attention=)
SETUPS = (("eager", "auto"), ("sdpa", "auto"), ("sdpa", "eager"))
BETA = 0.1
PACK = {"packed": 24, "prefix_shared": 48}
REFUSED: set[tuple[str, str, str, str]] = set()


def _pairs(window: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Three pairs of random ids; completions outrun a small sliding window."""
    g = torch.Generator().manual_seed(7)
    extra = window

    def ids(n: int) -> list[int]:
        return torch.randint(3, zoo.VOCAB, (n,), generator=g).tolist()

    prompts = [ids(4), ids(2), ids(6)]
    chosen = [ids(3 + extra), ids(5), ids(2 + extra)]
    rejected = [ids(5), ids(2 + extra), ids(4)]
    return prompts, chosen, rejected


def _window(model: torch.nn.Module) -> int:
    w = getattr(model.config, "sliding_window", None)
    return w if isinstance(w, int) and w < 16 else 0


def _oracle(model, prompts, chosen, rejected) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(2B,) sequence log-probs of each sequence alone, and the DPO gradient of every weight."""
    policy = copy.deepcopy(model).train()
    sums = []
    for side in (chosen, rejected):
        for p, c in zip(prompts, side, strict=True):
            ids = torch.tensor([p + c])
            logps = torch.log_softmax(policy(ids).logits[0].double(), -1)
            sums.append(
                logps[torch.arange(len(p) - 1, len(p) + len(c) - 1), ids[0, len(p) :]].sum()
            )
    logps = torch.stack(sums)
    b = len(prompts)
    ref = logps.detach()
    margin = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
    loss = -F.logsigmoid(BETA * margin).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name in zoo.FLOAT32_ONLY else torch.float64


def _tolerance(name: str, impl: str, attention: str) -> float:
    """1e-6 in float64. Parts that compute in float32 inside a float64 model round at 1e-7, which
    cancellation in a gradient can grow: eager attention's softmax (1e-5), MoE routers (2e-5).
    Models whose kernels lack float64 run in float32, where a batch and a single sequence round
    differently (5e-3)."""
    if name in zoo.FLOAT32_ONLY:
        return 5e-3
    if name in zoo.MOE or name in zoo.MOE_NO_AUX:
        return 2e-5
    return 1e-5 if "eager" in (impl, attention) else 1e-6


def _setups(name: str) -> list[tuple[str, str]]:
    return [s for s in SETUPS if s[0] != "sdpa" or name not in zoo.NO_SDPA]


CASES = [
    pytest.param(name, impl, attention, id=f"{name}-{impl}-{attention}")
    for name in zoo.ARCHITECTURES
    for impl, attention in _setups(name)
]


@pytest.mark.parametrize(("name", "impl", "attention"), CASES)
def test_one_step_equals_each_sequence_alone(name, impl, attention):
    base = zoo.cached(name, _dtype(name), impl)
    prompts, chosen, rejected = _pairs(_window(base))
    want_logps, want_grads = _oracle(base, prompts, chosen, rejected)
    dataset = PreferenceDataset.from_lists(prompts, chosen, rejected)
    b = len(prompts)
    for layout in LAYOUTS:
        model = copy.deepcopy(base)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = DPO(
            model,
            copy.deepcopy(base),
            beta=BETA,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            max_grad_norm=None,
            attention=attention,
            router_aux_loss_coef=0.0 if name in zoo.MOE else None,
        )
        batch = dataset.collate(
            range(b), layout=layout, max_length=None, pack_length=PACK.get(layout)
        )
        where = f"{name} {impl} attention={attention} {layout}"
        try:
            metrics = trainer.train_step(batch)
        except (TypeError, ValueError) as err:
            # A refusal names the model class and the layout, and leaves the weights alone.
            assert type(model).__name__ in str(err) and layout in str(err), (where, str(err))
            assert all(torch.equal(start[n], p) for n, p in model.named_parameters()), where
            REFUSED.add((name, impl, attention, layout))
            continue
        assert metrics["skipped"] == 0.0, where
        tol = _tolerance(name, impl, attention)
        got = torch.tensor(
            [metrics["chosen_logps"], metrics["rejected_logps"]], dtype=torch.float64
        )
        want = torch.stack([want_logps[:b].mean(), want_logps[b:].mean()])
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=where)
        # Relative to each parameter's largest gradient, or to 1e-3 of the model's largest where
        # a parameter's gradient is that much smaller (rounding is then relative to the model).
        floor = 1e-3 * max(float(g.abs().max()) for g in want_grads.values())
        for n, p in model.named_parameters():
            step = start[n] - p.detach()
            grad = want_grads.get(n, torch.zeros_like(step))
            scale = max(float(grad.abs().max()), floor)
            err = float((step - grad).abs().max()) / scale
            assert err <= tol, f"{where}: {n} off by {err:.2e} of its largest gradient"


@pytest.mark.parametrize("name", sorted(zoo.MOE & set(zoo.ARCHITECTURES)))
def test_router_loss_equals_the_models_own(name):
    """The load-balancing loss rlox adds equals the model's own ``aux_loss`` over the same real
    tokens: the padded batch's, and a packed batch's where the model can run packed rows."""
    model = zoo.cached(name, _dtype(name), "eager")
    # Equal lengths: the padded batch holds no padding, whose router logits some models' own
    # aux_loss would count (NaN where a sliding window leaves a padding query nothing to see).
    g = torch.Generator().manual_seed(5)
    prompts, chosen, rejected = (
        torch.randint(3, zoo.VOCAB, (3, n), generator=g).tolist() for n in (3, 5, 5)
    )
    dataset = PreferenceDataset.from_lists(prompts, chosen, rejected)
    padded = dataset.collate(range(3), layout="padded", max_length=None)
    with torch.no_grad():
        own = model(
            padded.input_ids, attention_mask=padded.attention_mask, output_router_logits=True
        ).aux_loss
        for layout in ("padded", "packed"):
            batch = dataset.collate(range(3), layout=layout, max_length=None)
            try:
                stats = sequence_stats(model, batch, accepted_kwargs(model), router_aux=True)
            except ValueError as err:
                assert f"cannot run the {layout} layout" in str(err), str(err)
                continue
            torch.testing.assert_close(
                stats.aux_loss.double(), own.double(), rtol=1e-6, atol=1e-9, msg=layout
            )


# Their own forward fails in bfloat16 (a float32 buffer meets bfloat16 weights).
BF16_BROKEN = frozenset({"inkling2_text", "inkling2_loop_text"})


@pytest.mark.parametrize("name", [n for n in zoo.ARCHITECTURES if n not in BF16_BROKEN])
def test_bf16_smoke(name):
    model = copy.deepcopy(zoo.cached(name, torch.float32, "eager")).to(torch.bfloat16)
    prompts, chosen, rejected = _pairs(_window(model))
    want, _ = _oracle(model, prompts, chosen, rejected)
    dataset = PreferenceDataset.from_lists(prompts, chosen, rejected)
    trainer = DPO(model, copy.deepcopy(model), router_aux_loss_coef=0.0)
    for layout in LAYOUTS:
        batch = dataset.collate(
            range(3), layout=layout, max_length=None, pack_length=PACK.get(layout)
        )
        try:
            metrics = trainer.compute_loss(batch)
        except (TypeError, ValueError) as err:
            assert type(model).__name__ in str(err) and layout in str(err), str(err)
            continue
        assert torch.isfinite(torch.tensor(metrics["loss"])), f"{name} {layout}"
        mean = float(want[:3].mean())
        assert abs(metrics["chosen_logps"] - mean) <= 0.05 * max(1.0, abs(mean)), f"{name} {layout}"


def test_probe_runs_once_per_model_and_layout(monkeypatch):
    model = copy.deepcopy(zoo.cached("llama", torch.float64, "sdpa"))
    model.__dict__.pop(probe._CACHE, None)
    searches = []
    search = probe._search

    def counting(*args, **kwargs):
        searches.append(args[1])
        return search(*args, **kwargs)

    monkeypatch.setattr(probe, "_search", counting)
    accepted = accepted_kwargs(model)
    dataset = PreferenceDataset.from_lists(*_pairs(0))
    for _ in range(2):
        for layout in LAYOUTS:
            sequence_stats(model, dataset.collate(range(3), layout=layout), accepted)
    assert searches == list(LAYOUTS)
    copy.deepcopy(model)  # a copy carries the verdicts
    sequence_stats(copy.deepcopy(model), dataset.collate(range(3), layout="packed"), accepted)
    assert searches == list(LAYOUTS)
