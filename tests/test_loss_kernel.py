"""The Rust DPO loss kernel (`rlox.dpo_loss`) and the torch entry point (`rlox.losses.dpo_loss`).

Everything is checked against the independent float64 reference in ``tests/reference.py``.
Tolerances follow a first-order rounding-error model of the kernel's arithmetic in the input
dtype: with unit roundoff ``u`` and ``S = |pi_c| + |ref_c| + |pi_r| + |ref_r|``, the margin
``z = beta * ((pi_c - ref_c) - (pi_r - ref_r))`` carries an error of order ``u * beta * S``; every
output's tolerance is that error propagated through the output's derivative, plus a few ulp of
its own magnitude.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import LOSS_TYPES, reference_grads, reference_losses, reference_losses_torch

import rlox
from rlox.losses import dpo_loss as torch_dpo_loss

UNIT_ROUNDOFF = {np.float32: 2.0**-24, np.float64: 2.0**-53}
# Slack factor on the unit roundoff: the kernel does a handful of roundings per output and
# its exp/log1p approximations are within a few ulp.
SLACK = 16.0

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------
# input generation


def make_inputs(
    rng: np.random.Generator,
    batch: int,
    beta: float,
    dtype,
    ref_scale: float,
    z_max: float,
) -> tuple[np.ndarray, ...]:
    """Four (B,) log-prob arrays whose margins satisfy |beta * delta| <= z_max (before rounding).

    The per-pair magnitude of ``beta * delta`` is log-uniform over [1e-6, z_max], with random sign,
    and about 5% of the pairs have delta exactly 0 (policy log-ratio equal on both sides).
    """
    rc = -rng.uniform(0.0, ref_scale, batch)
    rr = -rng.uniform(0.0, ref_scale, batch)
    z = np.sign(rng.uniform(-1, 1, batch)) * 10.0 ** rng.uniform(-6, math.log10(z_max), batch)
    z[rng.random(batch) < 0.05] = 0.0
    delta = z / beta
    w = rng.uniform(0.0, 1.0, batch)
    shift = rng.normal(0.0, 1.0, batch)
    uc = w * delta + shift
    ur = (w - 1.0) * delta + shift
    pc = rc + uc
    pr = rr + ur
    return tuple(np.ascontiguousarray(x, dtype=dtype) for x in (pc, pr, rc, rr))


@st.composite
def kernel_cases(draw, loss_types=LOSS_TYPES):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    batch = draw(
        st.one_of(
            st.integers(1, 20),
            st.sampled_from([2047, 2048, 2049, 4096 + 3]),
            st.integers(1, 10_000),
        )
    )
    beta = 10.0 ** draw(st.floats(-3.0, 1.0))
    loss_type = draw(st.sampled_from(loss_types))
    eps = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5, exclude_max=True)))
    if loss_type != "cdpo":  # only cdpo of these reads label_smoothing
        eps = 0.0
    ref_scale = 10.0 ** draw(st.floats(0.0, 3.0))
    z_max = 10.0 ** draw(st.floats(-3.0, 4.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    arrays = make_inputs(rng, batch, beta, dtype, ref_scale, z_max)
    lengths = (None, None)
    if loss_type == "ipo" or draw(st.booleans()):
        max_len = draw(st.sampled_from([1, 8, 512]))
        lengths = tuple(rng.integers(1, max_len + 1, batch) for _ in range(2))
    return dict(
        arrays=arrays,
        dtype=dtype,
        beta=beta,
        loss_type=loss_type,
        eps=eps,
        lengths=lengths,
    )


def run_kernel(case):
    lc, lr = case["lengths"]
    return rlox.dpo_loss(
        *case["arrays"],
        beta=case["beta"],
        loss_type=case["loss_type"],
        label_smoothing=case["eps"],
        chosen_lengths=lc,
        rejected_lengths=lr,
    )


def run_reference(case):
    lc, lr = case["lengths"]
    kw = dict(
        beta=case["beta"],
        loss_type=case["loss_type"],
        label_smoothing=case["eps"],
        chosen_lengths=lc,
        rejected_lengths=lr,
    )
    return reference_losses(*case["arrays"], **kw), reference_grads(*case["arrays"], **kw)


# --------------------------------------------------------------------------------------------
# error model


def pair_tolerances(pc, pr, rc, rr, *, beta, loss_type, lengths, u):
    """Per-pair absolute tolerances from the rounding-error model (``u``: slackened roundoff).

    Returns tolerances for the per-pair losses (``losses``), the per-pair derivatives
    ``d loss_i / d pi_c_i`` and ``d loss_i / d pi_r_i`` (``dlc``, ``dlr``; divide by B for the
    gradient of the mean), the rewards (``rc``, ``rr``), and a mask of hinge pairs so close to
    the kink that rounding may put them on either side (``ambiguous``).
    """
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    n = pc.shape[0]
    s_c = np.abs(pc) + np.abs(rc)
    s_r = np.abs(pr) + np.abs(rr)
    if loss_type == "ipo":
        lc, lr = (np.asarray(x, np.float64) for x in lengths)
        d = (pc - rc) / lc - (pr - rr) / lr - 0.5 / beta
        err_d = u * (s_c / lc + s_r / lr + 0.5 / beta)
        tol_loss = 2 * np.abs(d) * err_d + err_d**2 + u * d * d
        tol_dlc = 2.0 / lc * (err_d + u * np.abs(d))
        tol_dlr = 2.0 / lr * (err_d + u * np.abs(d))
        ambiguous = np.zeros(n, dtype=bool)
    else:
        err_z = u * beta * (s_c + s_r)
        z = beta * ((pc - rc) - (pr - rr))
        tol_loss = err_z + u * (np.abs(z) + 1.0)
        # |d^2 loss / dz^2| <= 1/4 for sigmoid and cdpo; the hinge gradient is piecewise constant.
        tol_dlc = beta * (0.25 * err_z + u)
        tol_dlr = tol_dlc
        ambiguous = (
            np.abs(1.0 - z) <= err_z + u if loss_type == "hinge" else np.zeros(n, dtype=bool)
        )
    return dict(
        losses=tol_loss,
        dlc=tol_dlc,
        dlr=tol_dlr,
        rc=u * beta * s_c + 1e-300,
        rr=u * beta * s_r + 1e-300,
        ambiguous=ambiguous,
    )


def tolerances(case, ref):
    """Per-element tolerances of the kernel's outputs (grads are of the MEAN loss)."""
    tol = pair_tolerances(
        *case["arrays"],
        beta=case["beta"],
        loss_type=case["loss_type"],
        lengths=case["lengths"],
        u=SLACK * UNIT_ROUNDOFF[case["dtype"]],
    )
    n = case["arrays"][0].shape[0]
    tol["gc"] = tol["dlc"] / n
    tol["gr"] = tol["dlr"] / n
    return tol


def assert_within(name, got, want, tol, mask=None):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    err = np.abs(got - want)
    bad = err > tol
    if mask is not None:
        bad &= ~mask
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(
            f"{name}[{i}]: got {got[i]!r}, want {want[i]!r}, |err|={err[i]:.3e} > tol "
            f"{np.broadcast_to(tol, err.shape)[i]:.3e} ({int(bad.sum())} bad of {bad.size})"
        )


# --------------------------------------------------------------------------------------------
# kernel vs reference


@SETTINGS
@given(kernel_cases())
def test_kernel_matches_reference(case):
    out = run_kernel(case)
    ref, (g_pc, g_pr, g_rc, g_rr) = run_reference(case)
    tol = tolerances(case, ref)
    dtype = case["dtype"]
    n = case["arrays"][0].shape[0]

    arrays = {
        "losses": out.losses,
        "grad_chosen": out.grad_chosen,
        "grad_rejected": out.grad_rejected,
        "chosen_rewards": out.chosen_rewards,
        "rejected_rewards": out.rejected_rewards,
    }
    for name, a in arrays.items():
        assert isinstance(a, np.ndarray), name
        assert a.dtype == dtype, name
        assert a.shape == (n,), name
        assert np.isfinite(a).all(), name
    for name in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        v = getattr(out, name)
        assert isinstance(v, float), name
        assert math.isfinite(v), name

    assert_within("losses", out.losses, ref["losses"], tol["losses"])
    assert_within("chosen_rewards", out.chosen_rewards, ref["chosen_rewards"], tol["rc"])
    assert_within("rejected_rewards", out.rejected_rewards, ref["rejected_rewards"], tol["rr"])
    # gradients of the mean loss vs float64 autograd of the reference formula
    assert_within("grad_chosen", out.grad_chosen, g_pc, tol["gc"], tol["ambiguous"])
    assert_within("grad_rejected", out.grad_rejected, g_pr, tol["gr"], tol["ambiguous"])
    # the reference log-probs enter with the opposite sign
    np.testing.assert_allclose(g_rc, -g_pc, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(g_rr, -g_pr, rtol=1e-12, atol=1e-300)

    # batch metrics vs the reference
    assert abs(out.loss - ref["loss"]) <= tol["losses"].mean() + 1e-12 * (abs(ref["loss"]) + 1)
    margin_tol = (tol["rc"] + tol["rr"]).mean() + 1e-12
    assert abs(out.reward_margin - ref["reward_margin"]) <= margin_tol
    assert abs(out.chosen_reward - ref["chosen_reward"]) <= tol["rc"].mean() + 1e-12
    assert abs(out.rejected_reward - ref["rejected_reward"]) <= tol["rr"].mean() + 1e-12
    # accuracy: only pairs whose rewards are within rounding of a tie may be classified differently
    rc_ref, rr_ref = ref["chosen_rewards"], ref["rejected_rewards"]
    near_tie = np.abs(rc_ref - rr_ref) <= tol["rc"] + tol["rr"]
    assert abs(out.reward_accuracy - ref["reward_accuracy"]) <= near_tie.sum() / n + 1e-12

    # batch metrics are consistent with the kernel's own per-pair outputs
    rc64 = out.chosen_rewards.astype(np.float64)
    rr64 = out.rejected_rewards.astype(np.float64)
    assert out.reward_accuracy == np.mean(out.chosen_rewards > out.rejected_rewards)
    assert out.loss == pytest.approx(np.mean(out.losses.astype(np.float64)), rel=1e-12, abs=1e-300)
    assert out.reward_margin == pytest.approx(np.mean(rc64 - rr64), rel=1e-9, abs=1e-12)
    assert out.chosen_reward == pytest.approx(np.mean(rc64), rel=1e-9, abs=1e-12)
    assert out.rejected_reward == pytest.approx(np.mean(rr64), rel=1e-9, abs=1e-12)

    if case["loss_type"] != "ipo":
        # sigmoid, cdpo and hinge depend on the pair only through z: opposite gradients
        np.testing.assert_array_equal(out.grad_rejected, -out.grad_chosen)


def test_kernel_many_chunks_matches_reference():
    """B larger than several rayon chunks (2^15 pairs) and blocks, with a ragged tail."""
    rng = np.random.default_rng(7)
    for loss_type in LOSS_TYPES:
        for dtype in (np.float32, np.float64):
            b = 3 * 2**15 + 2049
            case = dict(
                arrays=make_inputs(rng, b, 0.3, dtype, 300.0, 50.0),
                dtype=dtype,
                beta=0.3,
                loss_type=loss_type,
                eps=0.2 if loss_type == "cdpo" else 0.0,
                lengths=tuple(rng.integers(1, 100, b) for _ in range(2)),
            )
            out = run_kernel(case)
            ref, (g_pc, g_pr, _, _) = run_reference(case)
            tol = tolerances(case, ref)
            assert_within("losses", out.losses, ref["losses"], tol["losses"])
            assert_within("grad_chosen", out.grad_chosen, g_pc, tol["gc"], tol["ambiguous"])
            assert_within("grad_rejected", out.grad_rejected, g_pr, tol["gr"], tol["ambiguous"])
            assert abs(out.loss - ref["loss"]) <= tol["losses"].mean() + 1e-12
            assert out.reward_accuracy == np.mean(out.chosen_rewards > out.rejected_rewards)
            assert out.reward_margin == pytest.approx(ref["reward_margin"], rel=1e-5, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
    stride=st.integers(2, 4),
)
def test_kernel_non_contiguous_inputs_match_contiguous(loss_type, dtype, seed, stride):
    rng = np.random.default_rng(seed)
    b = 37
    big = [np.asarray(rng.normal(-20, 5, b * stride), dtype=dtype) for _ in range(4)]
    lens = [rng.integers(1, 9, b * stride) for _ in range(2)]
    views = [x[::stride] for x in big]
    lviews = [x[::stride] for x in lens]
    assert not views[0].flags.c_contiguous
    kw = dict(beta=0.4, loss_type=loss_type)
    a = rlox.dpo_loss(*views, chosen_lengths=lviews[0], rejected_lengths=lviews[1], **kw)
    copies = [np.ascontiguousarray(x) for x in views]
    lcopies = [np.ascontiguousarray(x) for x in lviews]
    b_ = rlox.dpo_loss(*copies, chosen_lengths=lcopies[0], rejected_lengths=lcopies[1], **kw)
    for name in ("losses", "grad_chosen", "grad_rejected", "chosen_rewards", "rejected_rewards"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b_, name), err_msg=name)
    assert a.loss == b_.loss


@settings(max_examples=20, deadline=None)
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    seed=st.integers(0, 2**32 - 1),
    int_dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32]),
)
def test_kernel_accepts_any_integer_length_dtype(loss_type, seed, int_dtype):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(-10, 3, 11) for _ in range(4)]
    lens = [rng.integers(1, 100, 11) for _ in range(2)]
    kw = dict(beta=0.7, loss_type=loss_type)
    a = rlox.dpo_loss(*arrays, chosen_lengths=lens[0], rejected_lengths=lens[1], **kw)
    b = rlox.dpo_loss(
        *arrays,
        chosen_lengths=lens[0].astype(int_dtype),
        rejected_lengths=lens[1].astype(int_dtype),
        **kw,
    )
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.grad_chosen, b.grad_chosen)


def test_kernel_extreme_margins_stay_finite():
    """|beta * delta| = 1e4 in both directions: losses are 0 / |z| and gradients saturate."""
    for dtype in (np.float32, np.float64):
        z = np.array([1e4, -1e4, 500.0, -500.0, 90.0, -90.0], dtype=np.float64)
        beta = 0.5
        pc = np.asarray(z / beta, dtype)
        zeros = np.zeros_like(pc)
        for eps in (0.0, 0.25):
            out = rlox.dpo_loss(
                pc, zeros, zeros, zeros, beta=beta, loss_type="cdpo", label_smoothing=eps
            )
            want = np.where(z > 0, eps * z, (1 - eps) * -z)  # softplus terms vanish
            np.testing.assert_allclose(out.losses, want, rtol=1e-6, atol=1e-30)
            # d loss_i / d z = eps - sigma(-z) -> eps (z >> 0) or eps - 1 (z << 0)
            want_g = np.where(z > 0, eps, eps - 1.0) * beta / z.size
            np.testing.assert_allclose(out.grad_chosen, want_g, rtol=1e-6, atol=1e-30)
            assert np.isfinite(out.losses).all() and np.isfinite(out.grad_chosen).all()


# --------------------------------------------------------------------------------------------
# golden values, computed by hand


def _single(pc, pr, rc, rr, **kw):
    arrays = [np.array([x], dtype=np.float64) for x in (pc, pr, rc, rr)]
    return rlox.dpo_loss(*arrays, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_golden_sigmoid(dtype):
    # u_c = -1 - (-3) = 2, u_r = -4 - (-3) = -1, beta = 0.5
    # z = 0.5 * (2 - (-1)) = 1.5
    # loss = -log sigma(1.5) = log(1 + e^-1.5) = log(1.22313016014843) = 0.2014132779827524
    # d loss / d pi_c = -beta * sigma(-1.5) = -0.5 * 0.18242552380635635 = -0.09121276190317817
    # rewards: 0.5 * 2 = 1.0 and 0.5 * -1 = -0.5; margin 1.5; accuracy 1
    arrays = [np.array([x], dtype=dtype) for x in (-1.0, -4.0, -3.0, -3.0)]
    out = rlox.dpo_loss(*arrays, beta=0.5)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    assert out.loss == pytest.approx(0.2014132779827524, rel=rtol)
    assert out.losses[0] == pytest.approx(0.2014132779827524, rel=rtol)
    assert out.grad_chosen[0] == pytest.approx(-0.09121276190317817, rel=rtol)
    assert out.grad_rejected[0] == pytest.approx(0.09121276190317817, rel=rtol)
    assert out.chosen_rewards[0] == 1.0
    assert out.rejected_rewards[0] == -0.5
    assert out.chosen_reward == 1.0
    assert out.rejected_reward == -0.5
    assert out.reward_margin == 1.5
    assert out.reward_accuracy == 1.0


def test_golden_cdpo():
    # conservative DPO on the same pair, label_smoothing eps = 0.1:
    # loss = 0.9 * softplus(-1.5) + 0.1 * softplus(1.5), and softplus(1.5) = 1.5 + softplus(-1.5)
    #      = softplus(-1.5) + 0.1 * 1.5 = 0.2014132779827524 + 0.15 = 0.3514132779827524
    # d loss / d z = eps * sigma(z) - (1 - eps) * sigma(-z) = eps - sigma(-z)
    #             = 0.1 - 0.18242552380635635 = -0.08242552380635634
    # d loss / d pi_c = beta * that = -0.04121276190317817
    out = _single(-1.0, -4.0, -3.0, -3.0, beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    assert out.loss == pytest.approx(0.3514132779827524, rel=1e-14)
    assert out.grad_chosen[0] == pytest.approx(-0.04121276190317817, rel=1e-14)
    assert out.grad_rejected[0] == pytest.approx(0.04121276190317817, rel=1e-14)
    # the rewards do not depend on the loss
    assert out.chosen_rewards[0] == 1.0 and out.rejected_rewards[0] == -0.5
    # sigmoid has no label smoothing (TRL 1.16): asking for it points to cdpo
    with pytest.raises(ValueError, match=r'^label_smoothing: .*loss_type="cdpo"'):
        _single(-1.0, -4.0, -3.0, -3.0, beta=0.5, label_smoothing=0.1)


def test_golden_sigmoid_batch_mean_and_gradient_scale():
    # two pairs: z = 1.5 (as above) and z = 0 (-> ln 2, d/dz = -1/2)
    # mean = (0.2014132779827524 + 0.6931471805599453) / 2 = 0.44728022927134885
    # grad of the MEAN: pair 0: -0.09121276190317817 / 2; pair 1: -0.5 * 0.5 / 2 = -0.125
    pc = np.array([-1.0, -2.0])
    pr = np.array([-4.0, -7.0])
    rc = np.array([-3.0, -2.0])
    rr = np.array([-3.0, -7.0])
    out = rlox.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert out.loss == pytest.approx(0.44728022927134885, rel=1e-14)
    np.testing.assert_allclose(out.grad_chosen, [-0.09121276190317817 / 2, -0.125], rtol=1e-14)
    # accuracy: pair 0 chosen 1.0 > -0.5; pair 1 tie 0 == 0 does not count
    assert out.reward_accuracy == 0.5
    assert out.reward_margin == pytest.approx(0.75, rel=1e-15)


def test_golden_hinge():
    # pair 0: beta = 0.5, u_c = 2, u_r = -1 -> z = 1.5 >= 1: inactive, loss 0, gradient 0
    # pair 1: u_c = 1, u_r = 0 -> z = 0.5: loss = 1 - 0.5 = 0.5,
    #         d loss_1 / d pi_c = -beta = -0.5, so d mean / d pi_c = -0.25, d mean / d pi_r = +0.25
    # mean loss = (0 + 0.5) / 2 = 0.25
    pc = np.array([-1.0, -1.0])
    pr = np.array([-4.0, -5.0])
    rc = np.array([-3.0, -2.0])
    rr = np.array([-3.0, -5.0])
    out = rlox.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    np.testing.assert_array_equal(out.losses, [0.0, 0.5])
    assert out.loss == 0.25
    np.testing.assert_array_equal(out.grad_chosen, [0.0, -0.25])
    np.testing.assert_array_equal(out.grad_rejected, [0.0, 0.25])
    np.testing.assert_array_equal(out.chosen_rewards, [1.0, 0.5])
    np.testing.assert_array_equal(out.rejected_rewards, [-0.5, 0.0])
    # z < 0: loss 1 - z = 1 + 1 = 2 (u_c = 0, u_r = 2, beta = 0.5)
    out = _single(-3.0, -1.0, -3.0, -3.0, beta=0.5, loss_type="hinge")
    assert out.loss == 2.0
    assert out.grad_chosen[0] == -0.5
    assert out.reward_accuracy == 0.0


def test_golden_ipo():
    # beta = 0.25 -> target 1 / (2 beta) = 2
    # u_c = 6 over 3 tokens -> 2 per token; u_r = -2 over 4 tokens -> -0.5 per token
    # d = 2 - (-0.5) - 2 = 0.5; loss = 0.25
    # d loss / d pi_c = 2 d / |y_c| = 1 / 3; d loss / d pi_r = -2 d / |y_r| = -0.25
    # rewards are beta * u: 1.5 and -0.5
    out = _single(
        -4.0,
        -12.0,
        -10.0,
        -10.0,
        beta=0.25,
        loss_type="ipo",
        chosen_lengths=np.array([3]),
        rejected_lengths=np.array([4]),
    )
    assert out.loss == pytest.approx(0.25, rel=1e-15)
    assert out.grad_chosen[0] == pytest.approx(1.0 / 3.0, rel=1e-15)
    assert out.grad_rejected[0] == pytest.approx(-0.25, rel=1e-15)
    assert out.chosen_rewards[0] == 1.5
    assert out.rejected_rewards[0] == -0.5
    # at the target the loss and gradient vanish: d = 2 per-token margin exactly
    out = _single(
        0.0,
        0.0,
        -4.0,
        0.0,
        beta=0.25,
        loss_type="ipo",
        chosen_lengths=np.array([2]),
        rejected_lengths=np.array([5]),
    )
    assert out.loss == 0.0
    assert out.grad_chosen[0] == 0.0 and out.grad_rejected[0] == 0.0


# --------------------------------------------------------------------------------------------
# at initialisation (policy == reference)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    batch=st.integers(1, 1000),
    beta=st.floats(1e-3, 10.0),
    loss_type=st.sampled_from(["sigmoid", "cdpo"]),
    eps=st.floats(0.0, 0.5, exclude_max=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_sigmoid_at_init_is_ln2(dtype, batch, beta, loss_type, eps, seed):
    if loss_type == "sigmoid":
        eps = 0.0  # sigmoid has no label smoothing
    rng = np.random.default_rng(seed)
    ref_c = np.asarray(-rng.uniform(0, 500, batch), dtype)
    ref_r = np.asarray(-rng.uniform(0, 500, batch), dtype)
    out = rlox.dpo_loss(
        ref_c.copy(),
        ref_r.copy(),
        ref_c,
        ref_r,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
    )
    atol = 1e-7 if dtype == np.float32 else 1e-15
    assert abs(out.loss - math.log(2.0)) <= atol
    np.testing.assert_allclose(out.losses, math.log(2.0), rtol=0, atol=atol)
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()
    assert out.reward_margin == 0.0
    assert out.chosen_reward == 0.0 and out.rejected_reward == 0.0
    assert out.reward_accuracy == 0.0
    # d loss / d z at z = 0 is eps * 1/2 - (1 - eps) * 1/2 = eps - 1/2
    want = (eps - 0.5) * beta / batch
    # eps and beta are rounded to the kernel's dtype first
    np.testing.assert_allclose(
        out.grad_chosen, want, rtol=1e-5, atol=4 * UNIT_ROUNDOFF[dtype] * beta / batch
    )


@pytest.mark.parametrize("batch", [2048, 10_000, 100_000])
def test_sigmoid_at_init_mean_is_ln2_for_large_batches(batch):
    """The mean over many identical ln 2 losses is still ln 2 to 1e-15 in float64.

    Every per-pair loss is ln 2 to 1 ulp, so only the batch reduction can add error here.
    """
    ref = -np.random.default_rng(batch).uniform(0, 500, batch)
    out = rlox.dpo_loss(ref.copy(), ref.copy(), ref, ref)
    np.testing.assert_allclose(out.losses, math.log(2.0), rtol=0, atol=1e-15)
    assert abs(out.loss - math.log(2.0)) <= 1e-15


# --------------------------------------------------------------------------------------------
# rlox.losses.dpo_loss: rust backend vs torch backend


@st.composite
def torch_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    batch = draw(st.integers(1, 300))
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    eps = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5, exclude_max=True)))
    if loss_type != "cdpo":  # only cdpo of these reads label_smoothing
        eps = 0.0
    beta = 10.0 ** draw(st.floats(-2.0, 0.5))
    seed = draw(st.integers(0, 2**32 - 1))
    backward = draw(st.sampled_from(["loss", "loss+sum", "weighted", "losses_only"]))
    needs_ref_grad = draw(st.booleans())
    rng = np.random.default_rng(seed)
    # moderate log-probs (bf16 has 8 significant bits); pick values on the dtype's grid
    vals = [torch.tensor(rng.uniform(-8.0, 0.0, batch)).to(dtype) for _ in range(4)]
    lens = tuple(torch.tensor(rng.integers(1, 16, batch)) for _ in range(2))
    weights = torch.tensor(rng.normal(0.0, 1.0, batch))
    return dict(
        dtype=dtype,
        vals=vals,
        lens=lens,
        beta=beta,
        loss_type=loss_type,
        eps=eps,
        backward=backward,
        needs_ref_grad=needs_ref_grad,
        weights=weights,
    )


def _run_backend(case, backend):
    leaves = [
        v.clone().requires_grad_(i < 2 or case["needs_ref_grad"])
        for i, v in enumerate(case["vals"])
    ]
    res = torch_dpo_loss(
        *leaves,
        beta=case["beta"],
        loss_type=case["loss_type"],
        label_smoothing=case["eps"],
        chosen_lengths=case["lens"][0],
        rejected_lengths=case["lens"][1],
        backend=backend,
    )
    kind = case["backward"]
    if kind == "loss":
        total = res.loss
    elif kind == "loss+sum":
        total = res.loss + res.losses.sum()
    elif kind == "weighted":
        total = 3.0 * res.loss + (res.losses * case["weights"].to(res.losses.dtype)).sum()
    else:
        total = (res.losses * case["weights"].to(res.losses.dtype)).sum()
    total.backward()
    return res, [x.grad for x in leaves]


TORCH_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8}


def _loss_weights(case) -> tuple[float, np.ndarray]:
    """(coefficient of the mean loss, per-pair coefficients of ``losses``) in the backward."""
    b = case["vals"][0].shape[0]
    # the weights the backends see, i.e. rounded to the input dtype
    w = case["weights"].to(case["dtype"]).double().numpy()
    return {
        "loss": (1.0, np.zeros(b)),
        "loss+sum": (1.0, np.ones(b)),
        "weighted": (3.0, w),
        "losses_only": (0.0, w),
    }[case["backward"]]


@SETTINGS
@given(torch_cases())
def test_rust_and_torch_backends_agree(case):
    """Both backends: same loss, losses, rewards and gradients w.r.t. all four inputs.

    Each backend is held to the float64 reference within the rounding-error model of its dtype,
    and the two to each other within the sum of those tolerances.
    """
    res_r, grads_r = _run_backend(case, "rust")
    res_t, grads_t = _run_backend(case, "torch")
    dtype = case["dtype"]
    b = case["vals"][0].shape[0]
    u = SLACK * TORCH_UNIT_ROUNDOFF[dtype]
    vals64 = [v.double().numpy() for v in case["vals"]]
    lens = [x.numpy() for x in case["lens"]]
    kw = dict(beta=case["beta"], loss_type=case["loss_type"], label_smoothing=case["eps"])
    ref = reference_losses(*vals64, chosen_lengths=lens[0], rejected_lengths=lens[1], **kw)
    tol = pair_tolerances(
        *vals64, beta=case["beta"], loss_type=case["loss_type"], lengths=lens, u=u
    )

    assert res_r.loss.shape == res_t.loss.shape == ()
    assert res_r.losses.shape == res_t.losses.shape == (b,)
    assert not res_r.chosen_rewards.requires_grad and not res_r.rejected_rewards.requires_grad
    want = {
        "losses": (ref["losses"], tol["losses"]),
        "chosen_rewards": (ref["chosen_rewards"], tol["rc"]),
        "rejected_rewards": (ref["rejected_rewards"], tol["rr"]),
        "loss": (np.array([ref["loss"]]), np.array([tol["losses"].mean() + u * ref["loss"]])),
    }
    for name, (value, t) in want.items():
        a, o = getattr(res_r, name), getattr(res_t, name)
        assert a.dtype == o.dtype == dtype, name
        a64 = a.detach().double().reshape(-1).numpy()
        o64 = o.detach().double().reshape(-1).numpy()
        assert np.isfinite(a64).all(), name
        assert_within(f"rust {name}", a64, value, t)
        assert_within(f"torch {name}", o64, value, t)
        assert_within(f"rust vs torch {name}", a64, o64, 2 * t)

    # gradients: d total / d pi_c_i = c_i * d loss_i / d pi_c_i, with c_i = c_mean / B + w_i;
    # the reference ones come from float64 autograd of the reference formula.
    c_mean, w = _loss_weights(case)
    # |c_mean| / B + |w_i| rather than |c_i|: the backends add the two parts in the input dtype
    coef = abs(c_mean) / b + np.abs(w)
    leaves = [torch.tensor(v, requires_grad=True) for v in vals64]
    losses = reference_losses_torch(
        *leaves, chosen_lengths=case["lens"][0], rejected_lengths=case["lens"][1], **kw
    )
    (c_mean * losses.mean() + (losses * torch.tensor(w)).sum()).backward()
    for i, (gr, gt, leaf) in enumerate(zip(grads_r, grads_t, leaves, strict=True)):
        if i >= 2 and not case["needs_ref_grad"]:
            assert gr is None and gt is None
            continue
        assert gr is not None and gt is not None, i
        assert gr.dtype == gt.dtype == dtype, i
        want_g = leaf.grad.numpy()
        t = coef * (tol["dlc"] if i % 2 == 0 else tol["dlr"]) + u * np.abs(want_g) + 1e-300
        gr64, gt64 = gr.double().numpy(), gt.double().numpy()
        assert np.isfinite(gr64).all(), i
        assert_within(f"rust grad {i}", gr64, want_g, t, tol["ambiguous"])
        assert_within(f"torch grad {i}", gt64, want_g, t, tol["ambiguous"])
        assert_within(f"rust vs torch grad {i}", gr64, gt64, 2 * t, tol["ambiguous"])


@settings(max_examples=25, deadline=None)
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 200),
)
def test_rust_backend_bf16_matches_float32_then_rounded(loss_type, seed, batch):
    """bf16 inputs on the rust backend: exactly the float32 result rounded to bf16."""
    rng = np.random.default_rng(seed)
    vals = [torch.tensor(rng.uniform(-8.0, 0.0, batch)).bfloat16() for _ in range(4)]
    lens = tuple(torch.tensor(rng.integers(1, 16, batch)) for _ in range(2))
    kw = dict(beta=0.3, loss_type=loss_type, chosen_lengths=lens[0], rejected_lengths=lens[1])
    leaves16 = [v.clone().requires_grad_(True) for v in vals]
    res16 = torch_dpo_loss(*leaves16, backend="rust", **kw)
    res16.loss.backward()
    leaves32 = [v.float().requires_grad_(True) for v in vals]
    res32 = torch_dpo_loss(*leaves32, backend="rust", **kw)
    res32.loss.backward()
    for name in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(
            getattr(res16, name), getattr(res32, name).bfloat16(), rtol=0, atol=0, msg=name
        )
    for a, b in zip(leaves16, leaves32, strict=True):
        torch.testing.assert_close(a.grad, b.grad.bfloat16(), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_auto_backend_on_cpu_is_the_rust_kernel(loss_type, dtype, seed):
    rng = np.random.default_rng(seed)
    vals = [torch.tensor(rng.uniform(-30.0, 0.0, 17), dtype=dtype) for _ in range(4)]
    lens = tuple(torch.tensor(rng.integers(1, 16, 17)) for _ in range(2))
    kw = dict(beta=0.2, loss_type=loss_type, chosen_lengths=lens[0], rejected_lengths=lens[1])
    auto = torch_dpo_loss(*vals, **kw)
    out = rlox.dpo_loss(
        *[v.numpy() for v in vals],
        beta=0.2,
        loss_type=loss_type,
        chosen_lengths=lens[0].numpy(),
        rejected_lengths=lens[1].numpy(),
    )
    assert float(auto.loss) == pytest.approx(out.loss, rel=1e-6 if dtype == torch.float32 else 0)
    np.testing.assert_array_equal(auto.losses.numpy(), out.losses)
    np.testing.assert_array_equal(auto.chosen_rewards.numpy(), out.chosen_rewards)
    np.testing.assert_array_equal(auto.rejected_rewards.numpy(), out.rejected_rewards)


def test_torch_backend_loss_at_init_is_ln2():
    x = torch.linspace(-50.0, -1.0, 9, dtype=torch.float64)
    y = torch.linspace(-20.0, -3.0, 9, dtype=torch.float64)
    for backend in ("rust", "torch"):
        res = torch_dpo_loss(x, y, x.clone(), y.clone(), beta=0.7, backend=backend)
        assert abs(float(res.loss) - math.log(2.0)) <= 1e-15
        assert (res.chosen_rewards == 0).all() and (res.rejected_rewards == 0).all()
