"""Bad input: ValueError / TypeError naming the argument (and the first bad index), never a panic."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import rlox
from rlox import _rlox
from rlox.losses import dpo_loss as torch_dpo_loss

NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
BACKENDS = ("rust", "torch")


def arrays(n=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.uniform(-20, -1, n), dtype=dtype) for _ in range(4)]


def tensors(n=5, dtype=torch.float64, seed=0):
    return [torch.from_numpy(a).to(dtype) for a in arrays(n, seed=seed)]


def lengths(n=5):
    return np.arange(1, n + 1), np.arange(n, 0, -1).copy()


# --------------------------------------------------------------------------------------------
# rlox.dpo_loss (the Rust kernel)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kernel_different_lengths(k):
    a = arrays()
    a[k] = a[k][:3]
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}: has length 3 but policy_chosen_logps"):
        rlox.dpo_loss(*a)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("shape", [(), (5, 1), (1, 5), (2, 2, 2)])
def test_kernel_not_1d(k, shape):
    a = arrays()
    a[k] = np.zeros(shape)
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}: must be 1-D"):
        rlox.dpo_loss(*a)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, np.bool_, np.complex128])
def test_kernel_non_float_dtype(k, dtype):
    a = arrays()
    a[k] = a[k].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{NAMES[k]}: must be float32 or float64"):
        rlox.dpo_loss(*a)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("kind", ["list", "tensor", "scalar", "none"])
def test_kernel_not_an_array(k, kind):
    a = arrays()
    a[k] = {
        "list": a[k].tolist(),
        "tensor": torch.from_numpy(a[k]),
        "scalar": 1.0,
        "none": None,
    }[kind]
    if kind == "none" and k >= 2:  # reference log-probs are optional, but sigmoid needs them
        with pytest.raises(ValueError, match=rf"^{NAMES[k]}: is missing; loss_type .sigmoid."):
            rlox.dpo_loss(*a)
        return
    with pytest.raises(TypeError, match=rf"{NAMES[k]}.*numpy.ndarray"):
        rlox.dpo_loss(*a)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("first", [np.float32, np.float64])
def test_kernel_mixed_float_dtypes(k, first):
    other = np.float64 if first == np.float32 else np.float32
    a = [x.astype(first) for x in arrays()]
    a[k] = a[k].astype(other)
    with pytest.raises(TypeError, match=rf"^{NAMES[k]}: dtype differs from policy_chosen_logps"):
        rlox.dpo_loss(*a)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_kernel_non_finite_logps_report_index(k, bad, dtype, loss_type):
    a = arrays(9, dtype)
    a[k][6] = bad
    a[k][4] = bad
    lc, lr = lengths(9)
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}\[4\]: log-prob is NaN or infinite"):
        rlox.dpo_loss(*a, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)


def test_kernel_non_finite_reports_the_first_index_over_all_inputs():
    a = arrays(9)
    a[0][7] = math.nan
    a[3][2] = math.inf
    a[2][2] = -math.inf
    with pytest.raises(ValueError, match=r"^ref_chosen_logps\[2\]: "):
        rlox.dpo_loss(*a)


def test_kernel_non_finite_index_in_a_later_chunk():
    a = arrays(100_000, np.float32)
    a[1][77_777] = math.nan
    a[1][99_999] = math.nan
    with pytest.raises(ValueError, match=r"^policy_rejected_logps\[77777\]: "):
        rlox.dpo_loss(*a)


@pytest.mark.parametrize("beta", [0.0, -0.1, -math.inf, math.inf, math.nan])
def test_kernel_bad_beta(beta):
    with pytest.raises(ValueError, match=r"^beta: must be a finite number > 0"):
        rlox.dpo_loss(*arrays(), beta=beta)


@pytest.mark.parametrize("beta", ["0.1", True, [0.1]])
def test_kernel_beta_wrong_type(beta):
    with pytest.raises(TypeError, match="beta"):
        rlox.dpo_loss(*arrays(), beta=beta)


@pytest.mark.parametrize("eps", [-1e-9, -0.5, 0.5, 0.75, 1.0, math.nan, math.inf])
def test_kernel_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match=r"^label_smoothing: must be in \[0, 0.5\)"):
        rlox.dpo_loss(*arrays(), label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["dpo", "Sigmoid", "", "ipo ", "kto"])
def test_kernel_unknown_loss_type(loss_type):
    with pytest.raises(ValueError, match=r"^loss_type: unknown loss type"):
        rlox.dpo_loss(*arrays(), loss_type=loss_type)


@pytest.mark.parametrize("loss_type", [1, b"ipo", ["sigmoid", 2]])
def test_kernel_loss_type_wrong_type(loss_type):
    with pytest.raises(TypeError, match="loss_type"):
        rlox.dpo_loss(*arrays(), loss_type=loss_type)


@pytest.mark.parametrize("missing", ["chosen_lengths", "rejected_lengths"])
def test_kernel_ipo_needs_lengths(missing):
    lc, lr = lengths()
    kw = {"chosen_lengths": lc, "rejected_lengths": lr}
    del kw[missing]
    with pytest.raises(ValueError, match=rf"^{missing}: .*needs completion lengths"):
        rlox.dpo_loss(*arrays(), loss_type="ipo", **kw)


@pytest.mark.parametrize("which", ["chosen_lengths", "rejected_lengths"])
@pytest.mark.parametrize("bad", [0, -3])
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_kernel_non_positive_lengths_report_index(which, bad, loss_type):
    lc, lr = lengths()
    kw = {"chosen_lengths": lc, "rejected_lengths": lr}
    kw[which][2] = bad
    kw[which][4] = bad
    with pytest.raises(
        ValueError, match=rf"^{which}\[2\]: completion length must be in \[1, 2\^31\)"
    ):
        rlox.dpo_loss(*arrays(), loss_type=loss_type, **kw)


def test_kernel_bad_lengths_shape_and_type():
    lc, lr = lengths()
    with pytest.raises(ValueError, match=r"^rejected_lengths: has length 4 but there are 5 pairs"):
        rlox.dpo_loss(*arrays(), loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr[:4])
    with pytest.raises(ValueError, match=r"^chosen_lengths: must be 1-D"):
        rlox.dpo_loss(*arrays(), loss_type="ipo", chosen_lengths=lc[None], rejected_lengths=lr)
    with pytest.raises(TypeError, match=r"^chosen_lengths: must hold integers"):
        rlox.dpo_loss(
            *arrays(), loss_type="ipo", chosen_lengths=lc.astype(float), rejected_lengths=lr
        )
    with pytest.raises(TypeError, match=r"^rejected_lengths: expected a numpy.ndarray"):
        rlox.dpo_loss(*arrays(), loss_type="ipo", chosen_lengths=lc, rejected_lengths=[1] * 5)


def test_kernel_empty_batch():
    with pytest.raises(ValueError, match=r"^policy_chosen_logps: is empty"):
        rlox.dpo_loss(*[np.zeros(0)] * 4)


def test_kernel_misaligned_arrays_are_valid_input():
    """A misaligned (but C-contiguous) array is a legal numpy array: same result, no panic."""
    a = arrays(6)
    lc, lr = lengths(6)
    want = rlox.dpo_loss(*a, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)

    def misaligned(x):
        buf = np.zeros(x.nbytes + 1, dtype=np.uint8)
        out = np.frombuffer(buf, dtype=x.dtype, offset=1, count=x.size)
        out[:] = x
        assert not out.flags.aligned and out.flags.c_contiguous
        return out

    bad = [misaligned(x) for x in a]
    got = rlox.dpo_loss(*bad, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    np.testing.assert_array_equal(got.losses, want.losses)
    got = rlox.dpo_loss(*a, loss_type="ipo", chosen_lengths=misaligned(lc), rejected_lengths=lr)
    np.testing.assert_array_equal(got.losses, want.losses)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": 10**400}, "beta"),
        ({"label_smoothing": -(10**400)}, "label_smoothing"),
    ],
)
def test_kernel_out_of_range_python_ints(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        rlox.dpo_loss(*arrays(), **kwargs)


# --------------------------------------------------------------------------------------------
# rlox.losses.dpo_loss, both backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_torch_loss_different_lengths(backend, k):
    t = tensors()
    t[k] = t[k][:3]
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}: has length 3"):
        torch_dpo_loss(*t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(4))
def test_torch_loss_not_1d(backend, k):
    t = tensors()
    t[k] = t[k][:, None]
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}: must be 1-D"):
        torch_dpo_loss(*t, backend=backend)
    t[k] = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}: must be 1-D"):
        torch_dpo_loss(*t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_torch_loss_integer_tensors(backend, k, dtype):
    t = tensors()
    t[k] = t[k].to(dtype)
    with pytest.raises(TypeError, match=rf"^{NAMES[k]}: must be a floating-point tensor"):
        torch_dpo_loss(*t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("kind", ["list", "numpy"])
def test_torch_loss_not_a_tensor(backend, k, kind):
    t = tensors()
    t[k] = t[k].tolist() if kind == "list" else t[k].numpy()
    with pytest.raises(TypeError, match=rf"^{NAMES[k]}: expected a torch.Tensor"):
        torch_dpo_loss(*t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_torch_loss_mixed_float_dtypes(backend, k):
    """float32 and float64 log-probs mixed: a TypeError naming the odd one, on both backends."""
    t = tensors(dtype=torch.float32)
    t[k] = t[k].double()
    with pytest.raises(TypeError, match=NAMES[k]):
        torch_dpo_loss(*t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_loss_non_finite_report_index(backend, k, bad, dtype):
    t = tensors(9, dtype=dtype)
    t[k][5] = bad
    t[k][3] = bad
    with pytest.raises(ValueError, match=rf"^{NAMES[k]}\[3\]: log-prob is NaN or infinite"):
        torch_dpo_loss(*t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, -1.0, math.nan, math.inf])
def test_torch_loss_bad_beta(backend, beta):
    with pytest.raises(ValueError, match=r"^beta: must be a finite number > 0"):
        torch_dpo_loss(*tensors(), beta=beta, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", ["0.1", None, True, torch.tensor(0.1)])
def test_torch_loss_beta_wrong_type(backend, beta):
    with pytest.raises(TypeError, match=r"^beta: expected a float"):
        torch_dpo_loss(*tensors(), beta=beta, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [-0.01, 0.5, 2.0, math.nan])
def test_torch_loss_bad_label_smoothing(backend, eps):
    with pytest.raises(ValueError, match=r"^label_smoothing: must be in \[0, 0.5\)"):
        torch_dpo_loss(*tensors(), label_smoothing=eps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dpo", "IPO", ["sigmoid", "dpo"]])
def test_torch_loss_unknown_loss_type(backend, loss_type):
    with pytest.raises(ValueError, match=r"^loss_type: unknown loss type"):
        torch_dpo_loss(*tensors(), loss_type=loss_type, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", [None, 3, ["sigmoid", 3]])
def test_torch_loss_loss_type_wrong_type(backend, loss_type):
    with pytest.raises(TypeError, match=r"^loss_type: expected a str or a list of str"):
        torch_dpo_loss(*tensors(), loss_type=loss_type, backend=backend)


def test_torch_loss_unknown_backend():
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'cuda'"):
        torch_dpo_loss(*tensors(), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("missing", ["chosen_lengths", "rejected_lengths"])
def test_torch_loss_ipo_needs_lengths(backend, missing):
    lc, lr = (torch.from_numpy(x) for x in lengths())
    kw = {"chosen_lengths": lc, "rejected_lengths": lr}
    del kw[missing]
    with pytest.raises(ValueError, match=rf"^{missing}: .*needs completion lengths"):
        torch_dpo_loss(*tensors(), loss_type="ipo", backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["chosen_lengths", "rejected_lengths"])
@pytest.mark.parametrize("bad", [0, -2])
def test_torch_loss_non_positive_lengths(backend, which, bad):
    lc, lr = (torch.from_numpy(x) for x in lengths())
    kw = {"chosen_lengths": lc, "rejected_lengths": lr}
    kw[which][1] = bad
    kw[which][3] = bad
    with pytest.raises(
        ValueError, match=rf"^{which}\[1\]: completion length must be in \[1, 2\^31\)"
    ):
        torch_dpo_loss(*tensors(), loss_type="ipo", backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_loss_lengths_shape(backend):
    lc, lr = (torch.from_numpy(x) for x in lengths())
    with pytest.raises(ValueError, match=r"^rejected_lengths: must have shape \(5,\)"):
        torch_dpo_loss(
            *tensors(), loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr[:2], backend=backend
        )
    with pytest.raises(TypeError, match=r"^chosen_lengths: expected a torch.Tensor"):
        torch_dpo_loss(
            *tensors(),
            loss_type="ipo",
            chosen_lengths=[1] * 5,
            rejected_lengths=lr,
            backend=backend,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_loss_empty(backend):
    with pytest.raises(ValueError, match=r"^policy_chosen_logps: is empty"):
        torch_dpo_loss(*[torch.zeros(0)] * 4, backend=backend)


# --------------------------------------------------------------------------------------------
# collate_pairs (python wrapper and raw kernel)

P = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
C = np.array([[1, 2], [3, 4], [5, 6]])
R = np.array([[7, 8], [9, 10], [11, 12]])


COLLATES = [
    pytest.param(rlox.collate_pairs, id="python"),
    pytest.param(_rlox.collate_pairs, id="raw"),
]


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("k", range(3))
def test_collate_negative_ids(collate, k):
    mats = [P.copy(), C.copy(), R.copy()]
    mats[k][1, 1] = -5
    mats[k][2, 0] = -6
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(ValueError, match=rf"^{name}\[1\]: negative token id -5"):
        collate(*mats)


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("k", [1, 2])
def test_collate_batch_size_mismatch(collate, k):
    mats = [P, C, R]
    mats[k] = mats[k][:2]
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(ValueError, match=rf"^{name}: has batch size 2 but prompt has 3"):
        collate(*mats)


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("k", [1, 2])
def test_collate_empty_completion(collate, k):
    mats = [P, C.copy(), R.copy()]
    mats[k][1] = 0
    mats[k][2] = 0
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(ValueError, match=rf"^{name}\[1\]: completion is empty after removing"):
        collate(*mats, pad_token_id=0)


@pytest.mark.parametrize("collate", COLLATES)
def test_collate_empty_prompt(collate):
    prompt = P.copy()
    prompt[2] = 99
    with pytest.raises(ValueError, match=r"^prompt\[2\]: prompt has no tokens after removing"):
        collate(prompt, C, R, pad_token_id=99)
    with pytest.raises(ValueError, match=r"^prompt\[0\]: prompt has no tokens"):
        collate(np.zeros((3, 0), dtype=np.int64), C, R)


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("k", range(3))
def test_collate_ids_outside_vocab(collate, k):
    mats = [P.copy(), C.copy(), R.copy()]
    mats[k][1, 0] = 20
    mats[k][2, 0] = 21
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(
        ValueError, match=rf"^{name}\[1\]: token id 20 is outside the vocabulary \(vocab_size=20\)"
    ):
        collate(*mats, vocab_size=20)
    collate(*mats, vocab_size=22)  # in range: fine


@pytest.mark.parametrize("k", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_collate_float_token_tensors(k, dtype):
    mats = [torch.from_numpy(m) for m in (P, C, R)]
    mats[k] = mats[k].to(dtype)
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(TypeError, match=rf"^{name}: token ids must be an integer tensor"):
        rlox.collate_pairs(*mats)


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("k", range(3))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, object])
def test_collate_float_token_arrays(collate, k, dtype):
    mats = [P, C, R]
    mats[k] = mats[k].astype(dtype)
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(TypeError, match=rf"^{name}: .*integers"):
        collate(*mats)


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("k", range(3))
@pytest.mark.parametrize("shape", [(3,), (3, 2, 1), ()])
def test_collate_not_2d(collate, k, shape):
    mats = [P, C, R]
    mats[k] = np.ones(shape, dtype=np.int64)
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(ValueError, match=rf"^{name}: must be 2-D"):
        collate(*mats)


def test_collate_ragged_lists():
    with pytest.raises(ValueError, match=r"^chosen: rows must all have the same length"):
        rlox.collate_pairs(P, [[1, 2], [3], [4, 5]], R)


def test_collate_raw_needs_arrays():
    with pytest.raises(TypeError, match=r"^prompt: expected a numpy.ndarray, got list"):
        _rlox.collate_pairs(P.tolist(), C, R)


@pytest.mark.parametrize("collate", COLLATES)
def test_collate_empty_batch(collate):
    with pytest.raises(ValueError, match=r"^prompt: batch is empty"):
        collate(P[:0], C[:0], R[:0])


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("value", [0.5, "0", [0]])
@pytest.mark.parametrize("name", ["pad_token_id", "vocab_size"])
def test_collate_option_wrong_type(collate, value, name):
    with pytest.raises(TypeError, match=name):
        collate(P, C, R, **{name: value})


@pytest.mark.parametrize("collate", COLLATES)
@pytest.mark.parametrize("value", [2**63, 2**70, -(2**64)])
@pytest.mark.parametrize("name", ["pad_token_id", "vocab_size"])
def test_collate_option_out_of_int64_range(collate, value, name):
    """An int that does not fit int64 is bad input like any other: ValueError naming it."""
    with pytest.raises((ValueError, TypeError), match=name):
        collate(P, C, R, **{name: value})


def test_collate_misaligned_ids_are_valid_input():
    buf = np.zeros(P.nbytes + 1, dtype=np.uint8)
    mis = np.frombuffer(buf, dtype=np.int64, offset=1, count=P.size).reshape(P.shape)
    assert not mis.flags.aligned and mis.flags.c_contiguous
    np.frombuffer(buf, dtype=np.int64, offset=1, count=P.size)[:] = P.reshape(-1)
    want = _rlox.collate_pairs(P, C, R)
    got = _rlox.collate_pairs(mis, C, R)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------------------------------------
# DPO(...) and train_step


class Tiny(nn.Module):
    def __init__(self, vocab=16, head_vocab=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, head_vocab or vocab)

    def forward(self, input_ids):
        return self.head(torch.cumsum(self.emb(input_ids), dim=1))


def pair(**kw):
    torch.manual_seed(0)
    m = Tiny(**kw)
    return m, copy.deepcopy(m)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"beta": 0.0}, ValueError, r"^beta: must be a finite number > 0"),
        ({"beta": -0.5}, ValueError, r"^beta: must be a finite number > 0"),
        ({"beta": math.nan}, ValueError, r"^beta: must be a finite number > 0"),
        ({"beta": "0.1"}, TypeError, r"^beta: expected a float"),
        ({"label_smoothing": 0.5}, ValueError, r"^label_smoothing: must be in"),
        ({"label_smoothing": -0.1}, ValueError, r"^label_smoothing: must be in"),
        ({"loss_type": "dpo"}, ValueError, r"^loss_type: unknown loss type 'dpo'"),
        ({"learning_rate": 0.0}, ValueError, r"^learning_rate: must be > 0"),
        ({"learning_rate": math.nan}, ValueError, r"^learning_rate: must be > 0"),
        ({"max_grad_norm": 0.0}, ValueError, r"^max_grad_norm: must be > 0 or None"),
        ({"max_grad_norm": -1.0}, ValueError, r"^max_grad_norm: must be > 0 or None"),
        ({"pad_token_id": 0.0}, TypeError, r"^pad_token_id: expected an int or None"),
        ({"pad_token_id": True}, TypeError, r"^pad_token_id: expected an int or None"),
    ],
)
def test_dpo_bad_options(kwargs, exc, pattern):
    policy, ref = pair()
    with pytest.raises(exc, match=pattern):
        rlox.DPO(policy, ref, **kwargs)


def test_dpo_bad_models():
    policy, ref = pair()
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module"):
        rlox.DPO(lambda x: x, ref)
    with pytest.raises(TypeError, match=r"^ref_model: expected a torch.nn.Module"):
        rlox.DPO(policy, "ref")
    with pytest.raises(ValueError, match=r"^ref_model: loss_type 'sigmoid' compares the policy"):
        rlox.DPO(policy, None)
    with pytest.raises(ValueError, match=r"^ref_model: must be a separate frozen copy"):
        rlox.DPO(policy, policy)


def _trainer(**kw):
    policy, ref = pair(**{k: kw.pop(k) for k in ("vocab", "head_vocab") if k in kw})
    return rlox.DPO(policy, ref, pad_token_id=0, **kw), policy


def _assert_untouched(trainer, policy, before):
    assert trainer.global_step == 0
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k


TP = torch.tensor([[1, 2, 3], [0, 4, 5]])
TC = torch.tensor([[6, 7], [8, 0]])
TR = torch.tensor([[9, 0], [10, 11]])


@pytest.mark.parametrize(
    ("mats", "exc", "pattern"),
    [
        ((TP, TC, torch.tensor([[9, 0], [10, -1]])), ValueError, r"^rejected\[1\]: negative token"),
        ((torch.tensor([[-1, 2, 3], [0, 4, 5]]), TC, TR), ValueError, r"^prompt\[0\]: negative"),
        ((TP, TC[:1], TR), ValueError, r"^chosen: has batch size 1 but prompt has 2"),
        ((TP, TC, TR[:1]), ValueError, r"^rejected: has batch size 1 but prompt has 2"),
        (
            (TP, torch.tensor([[6, 7], [0, 0]]), TR),
            ValueError,
            r"^chosen\[1\]: completion is empty",
        ),
        (
            (torch.tensor([[1, 2, 3], [0, 0, 0]]), TC, TR),
            ValueError,
            r"^prompt\[1\]: prompt has no",
        ),
        ((TP.float(), TC, TR), TypeError, r"^prompt: token ids must be an integer tensor"),
        ((TP, TC.double(), TR), TypeError, r"^chosen: token ids must be an integer tensor"),
        ((TP, TC, TR.half()), TypeError, r"^rejected: token ids must be an integer tensor"),
        ((TP, TC, None), ValueError, r"chosen: prompt, chosen and rejected are all required"),
    ],
)
@pytest.mark.parametrize("method", ["train_step", "compute_loss"])
def test_train_step_bad_batches(mats, exc, pattern, method):
    trainer, policy = _trainer()
    before = copy.deepcopy(policy.state_dict())
    with pytest.raises(exc, match=pattern):
        getattr(trainer, method)(*mats)
    _assert_untouched(trainer, policy, before)


@pytest.mark.parametrize("k", range(3))
def test_train_step_ids_outside_the_models_vocabulary(k):
    """Token ids >= the model's vocabulary: a ValueError naming the matrix and the pair."""
    trainer, policy = _trainer(vocab=16)
    before = copy.deepcopy(policy.state_dict())
    mats = [TP.clone(), TC.clone(), TR.clone()]
    mats[k][1, -1] = 16
    name = ("prompt", "chosen", "rejected")[k]
    with pytest.raises(ValueError, match=rf"^{name}\[1\]: token id .*vocabulary"):
        trainer.train_step(*mats)
    _assert_untouched(trainer, policy, before)


def test_sequence_logps_ids_outside_a_smaller_head():
    """Embedding larger than the output head: completion ids the head cannot score."""
    trainer, policy = _trainer(vocab=16, head_vocab=12)
    before = copy.deepcopy(policy.state_dict())
    with pytest.raises(ValueError, match=r"^rejected\[0\]: token id is outside .*\(V=12\)"):
        trainer.train_step(TP, TC, torch.tensor([[9, 13], [10, 11]]))
    _assert_untouched(trainer, policy, before)


def test_train_step_pair_batch_and_matrices():
    trainer, _ = _trainer()
    batch = rlox.collate_pairs(TP, TC, TR, pad_token_id=0)
    with pytest.raises(ValueError, match=r"^chosen: pass either a PairBatch"):
        trainer.train_step(batch, TC, TR)


# --------------------------------------------------------------------------------------------
# fuzzing: garbage in -> ValueError / TypeError only (pyo3 PanicException is a BaseException)

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
WILD_INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, -(10**400)]),
)
ALL_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int64,
    np.int32,
    np.uint8,
    np.uint64,
    np.bool_,
    np.complex64,
    object,
    ">f8",
    ">i8",
    "<U2",
]
# dtypes that get past the type checks, so that the later checks are exercised too
LIKELY_DTYPES = {1: [np.float64, np.float32], 2: [np.int64, np.int32, np.uint8]}
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


@st.composite
def garbage_arrays(draw, ndim_hint=1):
    kind = draw(
        st.sampled_from(
            ["array"] * 6
            + ["misaligned"] * 2
            + ["list", "none", "scalar", "tensor", "str", "strided"]
        )
    )
    n = draw(st.integers(0, 6))
    if kind == "none":
        return None
    if kind == "scalar":
        return draw(st.one_of(FLOATS, WILD_INTS))
    if kind == "str":
        return draw(st.text(max_size=4))
    if kind == "list":
        return draw(st.lists(st.lists(st.integers(-3, 20), min_size=n, max_size=n), max_size=4))
    dtype = draw(st.sampled_from(LIKELY_DTYPES[ndim_hint] * 4 + ALL_DTYPES))
    ndim = draw(st.sampled_from([ndim_hint] * 4 + [0, 1, 2, 3]))
    shape = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
    size = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(st.one_of(FLOATS, st.integers(-5, 30)), min_size=size, max_size=size))
    with np.errstate(all="ignore"):
        if np.dtype(dtype).kind in "iub":
            values = [
                0 if not math.isfinite(v) else int(max(min(v, 2**31), -(2**31))) for v in values
            ]
        arr = np.array(values, dtype=object).reshape(shape)
        try:
            arr = arr.astype(dtype)
        except (ValueError, TypeError, OverflowError):
            arr = np.zeros(shape, dtype=dtype)
    if kind == "tensor":
        try:
            return torch.from_numpy(np.ascontiguousarray(np.real(arr).astype(np.float64)))
        except (TypeError, ValueError):
            return torch.zeros(shape)
    if kind == "misaligned" and arr.dtype != object and arr.nbytes:
        buf = np.zeros(arr.nbytes + 1, dtype=np.uint8)
        out = np.frombuffer(buf, dtype=arr.dtype, offset=1, count=arr.size).reshape(arr.shape)
        out[...] = arr
        return out
    if kind == "strided" and arr.ndim >= 1:
        return np.repeat(arr, 2, axis=-1)[..., ::2]
    return arr


OPTION = st.one_of(FLOATS, WILD_INTS, st.none(), st.booleans(), st.text(max_size=3))


def _assert_value_or_type_error(fn):
    try:
        return fn(), None
    except BaseException as e:  # noqa: BLE001 - we must see panics, which are BaseExceptions
        assert isinstance(e, (ValueError, TypeError)), (
            f"{type(e).__module__}.{type(e).__name__}: {e}"
        )
        return None, e


def _valid_logps(arrays_):
    if not all(isinstance(a, np.ndarray) for a in arrays_):
        return False
    dt = arrays_[0].dtype
    return (
        dt in (np.dtype(np.float32), np.dtype(np.float64))
        and all(a.dtype == dt and a.ndim == 1 and a.shape == arrays_[0].shape for a in arrays_)
        and arrays_[0].size > 0
        and all(np.isfinite(a).all() for a in arrays_)
    )


@FUZZ
@given(
    data=st.data(),
    loss_type=st.one_of(st.sampled_from(["sigmoid", "hinge", "ipo"]), OPTION),
    beta=st.one_of(st.floats(1e-3, 10.0), OPTION),
    eps=st.one_of(st.floats(0.0, 0.49), OPTION),
)
def test_fuzz_dpo_loss(data, loss_type, beta, eps):
    arrays_ = [data.draw(garbage_arrays(1), label=name) for name in NAMES]
    if data.draw(st.booleans(), label="similar"):
        # mostly-valid inputs: one valid float array copied, then maybe one slot replaced
        base = np.asarray(data.draw(st.lists(FLOATS, min_size=0, max_size=5)), dtype=np.float64)
        arrays_ = [base.copy() for _ in NAMES]
        if data.draw(st.booleans()):
            arrays_[data.draw(st.integers(0, 3))] = data.draw(garbage_arrays(1))
    lens = [
        data.draw(st.one_of(st.none(), garbage_arrays(1)), label=name)
        for name in ("chosen_lengths", "rejected_lengths")
    ]
    out, err = _assert_value_or_type_error(
        lambda: rlox.dpo_loss(
            *arrays_,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=eps,
            chosen_lengths=lens[0],
            rejected_lengths=lens[1],
        )
    )
    if err is None:
        # success means the input was valid; None stands for an option's default
        assert _valid_logps(arrays_)
        assert ("sigmoid" if loss_type is None else loss_type) in ("sigmoid", "hinge", "ipo")
        beta = 0.1 if beta is None else beta
        assert math.isfinite(float(beta)) and float(beta) > 0
        # none of these types uses label smoothing (sigmoid ignores it, as TRL 1.16)
        assert float(0.0 if eps is None else eps) == 0.0
        n = arrays_[0].shape[0]
        for a in (out.losses, out.grad_chosen, out.grad_rejected):
            assert a.shape == (n,) and a.dtype == arrays_[0].dtype


@FUZZ
@given(
    data=st.data(),
    pad=st.one_of(st.none(), st.integers(-2, 30), OPTION),
    vocab=st.one_of(st.none(), st.integers(-2, 40), OPTION),
    python=st.booleans(),
)
def test_fuzz_collate_pairs(data, pad, vocab, python):
    mats = [data.draw(garbage_arrays(2), label=name) for name in ("prompt", "chosen", "rejected")]
    if data.draw(st.booleans(), label="similar"):
        b = data.draw(st.integers(0, 3))
        mats = [
            np.array(
                data.draw(
                    st.lists(
                        st.lists(st.integers(-1, 25), min_size=w, max_size=w),
                        min_size=b,
                        max_size=b,
                    )
                ),
                dtype=np.int64,
            ).reshape(b, w)
            for w in (data.draw(st.integers(0, 4)) for _ in range(3))
        ]
        if data.draw(st.booleans()):
            mats[data.draw(st.integers(0, 2))] = data.draw(garbage_arrays(2))
    fn = rlox.collate_pairs if python else _rlox.collate_pairs
    out, err = _assert_value_or_type_error(lambda: fn(*mats, pad_token_id=pad, vocab_size=vocab))
    if err is None:
        get = (lambda k: getattr(out, k).numpy()) if python else (lambda k: out[k])
        b = len(get("chosen_lengths"))
        ids, att = get("input_ids"), get("attention_mask")
        assert ids.shape[0] == 2 * b and att.shape == ids.shape
        total = int(get("chosen_lengths").sum() + get("rejected_lengths").sum())
        assert len(get("plan_row")) == total == int(get("loss_mask").sum())
        assert (get("chosen_lengths") >= 1).all() and (get("rejected_lengths") >= 1).all()
        assert (ids[att == 1] >= 0).all()
