"""PreferenceDataset: construction, persistence, layouts on real models, planning and loaders."""

from __future__ import annotations

import copy
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlox import DPO, PreferenceDataset, sequence_logps
from rlox.data import DATA_FILE, LAYOUTS, META_FILE
from rlox.loader import PreferenceBatchSampler
from rlox.models import TinyCausalLM, TinyLMConfig

VOCAB = 37


def random_pairs(n: int, seed: int, max_len: int = 9) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)

    def rows(lo: int) -> list[list[int]]:
        return [rng.integers(1, VOCAB, rng.integers(lo, max_len + 1)).tolist() for _ in range(n)]

    return rows(1), rows(1), rows(1)


@pytest.fixture(scope="module")
def dataset() -> PreferenceDataset:
    return PreferenceDataset.from_lists(*random_pairs(40, seed=0), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tiny_model() -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4)).eval()


def alone_logps(model: torch.nn.Module, ds: PreferenceDataset, indices) -> torch.Tensor:
    """(2B,) log-prob sums computed by running every sequence on its own, unpadded."""
    out = []
    for side in ("chosen", "rejected"):
        for i in indices:
            pair = ds[int(i)]
            ids = torch.tensor(np.concatenate([pair["prompt"], pair[side]]))[None].long()
            with torch.no_grad():
                res = model(ids)
            logits = res.logits if hasattr(res, "logits") else res
            logp = torch.log_softmax(logits[0].double(), -1)
            p = len(pair["prompt"])
            tgt = ids[0, p:]
            out.append(logp[p - 1 : -1].gather(1, tgt[:, None]).sum())
    return torch.stack(out)


# ------------------------------------------------------------------ layouts agree on real models
def hf_models() -> list:
    import transformers

    torch.manual_seed(1)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    return [gpt2.eval(), llama.eval()]


@pytest.mark.parametrize("which", ["tiny", "gpt2", "llama"])
def test_layouts_agree_with_sequences_run_alone(dataset, tiny_model, which):
    model = tiny_model if which == "tiny" else hf_models()[which == "llama"]
    idx = np.array([3, 0, 17, 5, 29, 11])
    want = alone_logps(model, dataset, idx)
    for layout in LAYOUTS:
        for pack_length in (None, 24) if layout == "packed" else (None,):
            batch = dataset.collate(idx, layout=layout, max_length=24, pack_length=pack_length)
            with torch.no_grad():
                got = sequence_logps(model, batch)
            torch.testing.assert_close(
                got.double(), want, rtol=0, atol=1e-5, msg=f"{which} {layout} {pack_length}"
            )


def test_lm_head_runs_only_at_plan_points(dataset, tiny_model):
    batch = dataset.collate(np.arange(8), layout="prefix_shared")
    n = batch.plan_row.shape[0]
    seen = []
    sequence_logps(tiny_model, batch)  # the first call also probes the route
    hook = tiny_model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            sequence_logps(tiny_model, batch)
    finally:
        hook.remove()
    assert seen == [torch.Size([n, VOCAB])]

    gpt2 = hf_models()[0]
    seen.clear()
    sequence_logps(gpt2, batch)
    hook = gpt2.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            sequence_logps(gpt2, batch)
    finally:
        hook.remove()
    assert seen == [torch.Size([n, VOCAB])]


def test_train_step_is_the_same_in_every_layout(dataset):
    torch.manual_seed(2)
    base = TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2))
    idx = np.arange(10)
    results = {}
    for layout in LAYOUTS:
        policy = copy.deepcopy(base)
        trainer = DPO(policy, copy.deepcopy(base), learning_rate=1e-2)
        metrics = trainer.train_step(dataset.collate(idx, layout=layout))
        results[layout] = (metrics, torch.nn.utils.parameters_to_vector(policy.parameters()))
    m0, p0 = results["padded"]
    for layout in ("packed", "prefix_shared"):
        m, p = results[layout]
        for key in ("loss", "chosen_logps", "rejected_logps", "grad_norm"):
            assert m[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-5), (layout, key)
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-5)


def test_model_without_mask_keywords_cannot_take_packed(dataset):
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids):
            return self.emb(input_ids)

    batch = dataset.collate([0, 1], layout="packed")
    with pytest.raises(TypeError, match="model: the packed layout needs"):
        sequence_logps(Plain(), batch)
    assert sequence_logps(Plain(), dataset.collate([0, 1])).shape == (4,)


def test_all_pairs_skipped_makes_a_skipped_step(tiny_model):
    ds = PreferenceDataset.from_lists([[1, 2, 3, 4]], [[5]], [[6]])
    batch = ds.collate([0], max_length=4)
    assert batch.num_pairs == 0 and batch.skipped.tolist() == [0]
    trainer = DPO(copy.deepcopy(tiny_model), tiny_model)
    with pytest.warns(RuntimeWarning, match="skipped by truncation"):
        metrics = trainer.train_step(batch)
    assert metrics["skipped"] == 1.0 and trainer.global_step == 0


# ------------------------------------------------------------------ truncation, by hand
def test_truncation_hand_example():
    ds = PreferenceDataset.from_lists(
        [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]], [[10, 11, 12], [7]], [[13], [8, 9]]
    )
    b = ds.collate([0, 1], max_length=5, max_prompt_length=3)
    # pair 0: prompt keeps its end [3, 4, 5]; chosen cut to 2 tokens, rejected whole
    assert b.input_ids.tolist() == [
        [3, 4, 5, 10, 11],
        [4, 5, 6, 7, 0],
        [3, 4, 5, 13, 0],
        [4, 5, 6, 8, 9],
    ]
    assert b.num_truncated == 2 and b.skipped.tolist() == []
    assert b.chosen_lengths.tolist() == [2, 1] and b.rejected_lengths.tolist() == [1, 2]
    b = ds.collate([0, 1], max_length=5, max_prompt_length=3, truncation="keep_start")
    assert b.input_ids[0].tolist() == [1, 2, 3, 10, 11]
    b = ds.collate([0, 1], max_length=6)
    assert b.pair_index.tolist() == [0] and b.skipped.tolist() == [1]
    b = ds.collate([0, 1], max_length=None)
    assert b.input_ids.shape == (4, 8) and b.num_truncated == 0


def test_padded_batch_is_trl_layout(dataset):
    b = dataset.collate([4, 9], pad_token_id=0, pad_to_multiple_of=8)
    assert b.input_ids.shape[0] == 4 and b.input_ids.shape[1] % 8 == 0
    for row, (i, side) in enumerate(
        [(4, "chosen"), (9, "chosen"), (4, "rejected"), (9, "rejected")]
    ):
        pair = dataset[i]
        seq = np.concatenate([pair["prompt"], pair[side]])
        n, p = len(seq), len(pair["prompt"])
        assert b.input_ids[row, :n].tolist() == seq.tolist()
        assert b.input_ids[row, n:].eq(0).all()
        assert b.attention_mask[row].tolist() == [1] * n + [0] * (b.input_ids.shape[1] - n)
        assert b.loss_mask[row].nonzero().flatten().tolist() == list(range(p, n))
        assert b.position_ids[row, :n].tolist() == list(range(n))


# ------------------------------------------------------------------ construction without copies
def test_from_arrays_and_arrow_do_not_copy():
    P, C, R = random_pairs(20, seed=3)
    table = pa.table(
        {
            "prompt_ids": pa.array(P, pa.list_(pa.int32())),
            "chosen_ids": pa.array(C, pa.large_list(pa.int64())),
            "rejected_ids": pa.array(R, pa.list_(pa.int32())),
        }
    )
    ds = PreferenceDataset.from_arrow(table)
    for name in ("prompt", "chosen", "rejected"):
        col = table[f"{name}_ids"].chunk(0)
        assert np.shares_memory(ds.arrays[f"{name}_values"], col.values.to_numpy())
        assert np.shares_memory(ds.arrays[f"{name}_offsets"], col.offsets.to_numpy())
        assert [ds[i][name].tolist() for i in range(20)] == {
            "prompt": P,
            "chosen": C,
            "rejected": R,
        }[name]
    arrays = {k: v.copy() for k, v in ds.arrays.items()}
    ds2 = PreferenceDataset.from_arrays(**arrays)
    assert all(np.shares_memory(ds2.arrays[k], v) for k, v in arrays.items())

    sliced = PreferenceDataset.from_arrow(table.slice(5, 10))
    assert [sliced[i]["chosen"].tolist() for i in range(10)] == C[5:15]


def test_from_hf_datasets_with_index_mapping():
    import datasets

    P, C, R = random_pairs(12, seed=4)
    hf = datasets.Dataset.from_dict({"prompt_ids": P, "chosen_ids": C, "rejected_ids": R})
    ds = PreferenceDataset.from_arrow(hf)
    assert len(ds) == 12 and ds[7]["rejected"].tolist() == R[7]
    picked = hf.select([9, 2, 2])
    ds = PreferenceDataset.from_arrow(picked)
    assert [ds[i]["prompt"].tolist() for i in range(3)] == [P[9], P[2], P[2]]


def test_chunked_arrow_columns():
    P, C, R = random_pairs(10, seed=5)
    t = pa.concat_tables(
        [
            pa.table({"prompt_ids": P[:4], "chosen_ids": C[:4], "rejected_ids": R[:4]}),
            pa.table({"prompt_ids": P[4:], "chosen_ids": C[4:], "rejected_ids": R[4:]}),
        ]
    )
    assert t["prompt_ids"].num_chunks == 2
    ds = PreferenceDataset.from_arrow(t)
    assert [ds[i]["chosen"].tolist() for i in range(10)] == C


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip_and_mmap(tmp_path, dataset):
    dataset.save(tmp_path / "s")
    for mmap in (True, False):
        back = PreferenceDataset.load(tmp_path / "s", mmap=mmap, verify=True)
        assert len(back) == len(dataset)
        for k, v in dataset.arrays.items():
            np.testing.assert_array_equal(back.arrays[k], v, err_msg=k)
    mapped = PreferenceDataset.load(tmp_path / "s")
    assert isinstance(mapped.arrays["chosen_values"].base, np.memmap) or isinstance(
        mapped._arrays["chosen_values"], np.memmap
    )
    # a memory-mapped store pickles as its path, not its tokens
    blob = pickle.dumps(mapped)
    assert len(blob) < 1000
    assert (
        pickle.loads(blob).arrays["chosen_values"].tolist()
        == dataset.arrays["chosen_values"].tolist()
    )
    assert len(pickle.dumps(dataset)) > dataset.arrays["chosen_values"].nbytes


def test_corrupted_or_truncated_store(tmp_path, dataset):
    path = dataset.save(tmp_path / "s")
    data = path / DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"^path: section prompt_values .* checksum"):
        PreferenceDataset.load(path, verify=True)
    data.write_bytes(bytes(raw[:-9]))
    with pytest.raises(ValueError, match=r"^path: .*truncated"):
        PreferenceDataset.load(path)
    dataset.save(path)
    meta = json.loads((path / META_FILE).read_text())
    meta["num_pairs"] += 1
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"^path: .*header checksum"):
        PreferenceDataset.load(path)
    (path / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"^path: .*corrupted"):
        PreferenceDataset.load(path)
    with pytest.raises(ValueError, match=r"^path: .*not an rlox store"):
        PreferenceDataset.load(tmp_path / "nowhere")


def test_corrupted_offsets_fail_at_use_not_with_a_panic(tmp_path, dataset):
    path = dataset.save(tmp_path / "s")
    meta = json.loads((path / META_FILE).read_text())
    sec = next(s for s in meta["sections"] if s["name"] == "chosen_offsets")
    raw = bytearray((path / DATA_FILE).read_bytes())
    at = sec["offset"] + 8 * 5  # offsets[5] of chosen
    raw[at : at + 8] = (10**6).to_bytes(8, "little")
    (path / DATA_FILE).write_bytes(bytes(raw))
    ds = PreferenceDataset.load(path)  # O(1) open does not read offsets[5]
    ds.collate([0, 1, 2])
    with pytest.raises(ValueError, match=r"^chosen_offsets\[4\]"):
        ds.collate([0, 4])
    with pytest.raises(ValueError, match=r"^chosen_offsets\[4\]"):
        ds.verify()
    with pytest.raises(ValueError, match=r"checksum"):
        PreferenceDataset.load(path, verify=True)


def test_save_is_atomic_over_an_existing_store(tmp_path, dataset, monkeypatch):
    path = dataset.save(tmp_path / "s")
    small = dataset.select([1, 2])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        small.save(path)
    monkeypatch.undo()
    assert len(PreferenceDataset.load(path, verify=True)) == len(dataset)
    assert sorted(p.name for p in path.iterdir()) == sorted([DATA_FILE, META_FILE])


# ------------------------------------------------------------------ views and splits
def test_select_shard_split(dataset):
    sub = dataset.select([5, 1, 5])
    assert [sub[i]["chosen"].tolist() for i in range(3)] == [
        dataset[j]["chosen"].tolist() for j in (5, 1, 5)
    ]
    shards = [dataset.shard(r, 3) for r in range(3)]
    assert sum(len(s) for s in shards) == len(dataset)
    assert shards[1][0]["prompt"].tolist() == dataset[len(shards[0])]["prompt"].tolist()
    strided = dataset.shard(1, 3, contiguous=False)
    assert strided[1]["prompt"].tolist() == dataset[4]["prompt"].tolist()
    train, test = dataset.train_test_split(0.25, seed=1)
    assert (len(train), len(test)) == (30, 10)
    seen = sorted(
        tuple(d["prompt"].tolist() + [-1] + d["chosen"].tolist()) for d in list(train) + list(test)
    )
    assert seen == sorted(
        tuple(d["prompt"].tolist() + [-1] + d["chosen"].tolist()) for d in dataset
    )
    again = dataset.train_test_split(0.25, seed=1)[1]
    assert [d["chosen"].tolist() for d in again] == [d["chosen"].tolist() for d in test]
    with pytest.raises(ValueError, match="test_size"):
        dataset.train_test_split(1.5)
    with pytest.raises(ValueError, match="rank"):
        dataset.shard(3, 3)


def test_stats_by_hand():
    ds = PreferenceDataset.from_lists([[1], [1, 2]], [[3, 4], [5]], [[6], [7, 8, 9]])
    s = ds.stats(batch_size=2, group_by_length=False)
    assert s["pairs"] == 2
    assert s["tokens"] == {"prompt": 3, "chosen": 3, "rejected": 4}
    assert s["lengths"]["rejected"]["p100"] == 3.0
    # padded: rows 1+2, 2+1, 1+1, 2+3 -> 4 rows of 5 = 20 slots, 13 real tokens
    assert s["padding"]["padded"] == {"tokens": 13, "slots": 20, "fraction": 1 - 13 / 20}
    assert s["padding"]["packed"]["fraction"] == 0.0
    # prefix_shared: rows 1+2+1 and 2+1+3 -> 2 rows of 6
    assert s["padding"]["prefix_shared"]["slots"] == 12
    assert s["padding"]["prefix_shared"]["tokens"] == 10


# ------------------------------------------------------------------ planning and loaders
def test_batches_cover_each_pair_once_per_epoch_on_all_ranks(dataset):
    plans = [dataset.batches(batch_size=4, rank=r, world_size=3, seed=7) for r in range(3)]
    assert len({len(p) for p in plans}) == 1
    got = np.sort(np.concatenate([p.indices for p in plans]))
    np.testing.assert_array_equal(got, np.arange(len(dataset)))
    a = dataset.batches(batch_size=4, seed=7, epoch=1)
    b = dataset.batches(batch_size=4, seed=7, epoch=1)
    c = dataset.batches(batch_size=4, seed=7, epoch=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]
    tok = dataset.batches(max_tokens=60, layout="packed")
    lens = dataset.lengths()
    for batch in tok:
        cost = int((2 * lens.prompt[batch] + lens.chosen[batch] + lens.rejected[batch]).sum())
        assert cost <= 60 or len(batch) == 1


def test_group_by_length_reduces_padding():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 200, size=(3, 2000))
    rows = [[[1] * int(n) for n in col] for col in lens]
    ds = PreferenceDataset.from_lists(*rows)
    grouped = ds.stats(16)["padding"]["padded"]["fraction"]
    plain = ds.stats(16, group_by_length=False)["padding"]["padded"]["fraction"]
    assert grouped < plain / 2


def test_sampler_and_collator_in_a_dataloader_with_workers(tmp_path, dataset):
    mapped = PreferenceDataset.load(dataset.save(tmp_path / "s"))
    sampler = PreferenceBatchSampler(mapped, batch_size=6, seed=3)
    sampler.set_epoch(2)
    collate = mapped.collator(layout="packed", max_length=12)
    loader = torch.utils.data.DataLoader(
        mapped,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=2,
        multiprocessing_context="spawn",
    )
    got = list(loader)
    plan = dataset.batches(batch_size=6, seed=3, epoch=2)
    assert len(got) == len(plan) == len(sampler)
    for batch, idx in zip(got, plan, strict=True):
        want = dataset.collate(idx, layout="packed", max_length=12)
        assert batch.layout == "packed"
        torch.testing.assert_close(batch.input_ids, want.input_ids)
        torch.testing.assert_close(batch.pair_index, want.pair_index)
    # per-item fetching (no __getitems__ path) collates the same batch
    items = [mapped[i] for i in plan[0]]
    torch.testing.assert_close(collate(items).input_ids, got[0].input_ids)


# ------------------------------------------------------------------ bad input, one case each
_V = np.array([1, 2, 3, 4], np.int32)
_O = np.array([0, 1, 2, 4])


def _arrays(**over):
    base = {
        f"{c}_{k}": (_V if k == "values" else _O)
        for c in ("prompt", "chosen", "rejected")
        for k in ("values", "offsets")
    }
    return base | over


BAD_INPUT = [
    (
        "non-monotone offsets",
        lambda: PreferenceDataset.from_arrays(**_arrays(prompt_offsets=np.array([0, 2, 1, 4]))),
        ValueError,
        r"^prompt_offsets\[1\]",
    ),
    (
        "offsets past the values",
        lambda: PreferenceDataset.from_arrays(**_arrays(rejected_offsets=np.array([0, 1, 2, 5]))),
        ValueError,
        r"^rejected_offsets\[2\]",
    ),
    (
        "negative id",
        lambda: PreferenceDataset.from_arrays(**_arrays(chosen_values=np.array([1, -2, 3, 4]))),
        ValueError,
        r"^chosen\[1\]: negative token id -2",
    ),
    (
        "id at vocab size",
        lambda: PreferenceDataset.from_arrays(**_arrays(), vocab_size=4),
        ValueError,
        r"^prompt\[2\]: token id 4 is outside the vocabulary",
    ),
    (
        "empty completion",
        lambda: PreferenceDataset.from_arrays(**_arrays(chosen_offsets=np.array([0, 1, 1, 4]))),
        ValueError,
        r"^chosen\[1\]: empty completion",
    ),
    (
        "empty prompt",
        lambda: PreferenceDataset.from_lists([[1], []], [[1], [2]], [[1], [2]]),
        ValueError,
        r"^prompt\[1\]: empty prompt",
    ),
    (
        "mismatched columns",
        lambda: PreferenceDataset.from_arrays(**_arrays(rejected_offsets=np.array([0, 4]))),
        ValueError,
        r"^rejected: has 1 rows but prompt has 3",
    ),
    (
        "float values",
        lambda: PreferenceDataset.from_arrays(**_arrays(prompt_values=_V.astype(float))),
        TypeError,
        r"^prompt_values: must hold integers",
    ),
    (
        "float ids in lists",
        lambda: PreferenceDataset.from_lists([[1], [2]], [[1], [2.5]], [[1], [2]]),
        TypeError,
        r"^chosen\[1\]: token ids must be ints",
    ),
    (
        "missing column",
        lambda: PreferenceDataset.from_arrow(pa.table({"prompt_ids": [[1]], "chosen_ids": [[2]]})),
        ValueError,
        r"^rejected_ids: missing column",
    ),
    (
        "non-integer column",
        lambda: PreferenceDataset.from_arrow(
            pa.table({"prompt_ids": [[1]], "chosen_ids": [[2]], "rejected_ids": [[1.5]]})
        ),
        TypeError,
        r"^rejected_ids: expected an Arrow list<int> column",
    ),
    (
        "unknown layout",
        lambda: PreferenceDataset.from_arrays(**_arrays()).collate([0], layout="dense"),
        ValueError,
        r"^layout: unknown layout",
    ),
    (
        "unknown truncation",
        lambda: PreferenceDataset.from_arrays(**_arrays()).collate([0], truncation="middle"),
        ValueError,
        r"^truncation: unknown truncation mode",
    ),
    (
        "index out of range",
        lambda: PreferenceDataset.from_arrays(**_arrays()).collate([0, 7]),
        ValueError,
        r"^indices\[1\]: pair index 7 is out of range",
    ),
    (
        "both batch options",
        lambda: PreferenceDataset.from_arrays(**_arrays()).batches(batch_size=2, max_tokens=9),
        ValueError,
        r"^batch_size: give exactly one",
    ),
]


@pytest.mark.parametrize(
    ("fn", "exc", "pattern"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_names_field_and_first_bad_pair(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_resident_pages_are_released_past_the_budget(tmp_path, dataset, monkeypatch):
    import rlox.mapped

    path = dataset.save(tmp_path / "s")
    calls = []
    monkeypatch.setattr(rlox.mapped.MappedStore, "release", lambda self: calls.append(1))
    resident = [100 << 20]
    monkeypatch.setattr(rlox.mapped, "resident_file_bytes", lambda: resident[0])
    for budget, released in ((1 << 20, True), (None, False), (1 << 30, False)):
        calls.clear()
        resident[0] = 100 << 20
        mapped = PreferenceDataset.load(path, max_resident=budget)
        calls.clear()
        resident[0] += 10 << 20  # pages mapped while collating
        for idx in mapped.batches(batch_size=2):
            mapped.collate(idx)
        assert bool(calls) == released, budget
