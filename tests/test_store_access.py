"""How a mapped store is read: direct (O_DIRECT) reads of each batch's runs and the memory map
give the batches of the in-memory store, in every layout, over parts and concatenations."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlox.mapped
from rlox import PreferenceDataset
from rlox.batch import LAYOUTS
from rlox.store_writer import StoreWriter

SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def random_columns(n: int, seed: int, longest: int) -> list[np.ndarray]:
    """Six arrays (values, offsets per column) with lengths 1..longest, ids < 30000."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        offsets = np.concatenate([[0], np.cumsum(rng.integers(1, longest + 1, n))])
        out += [rng.integers(0, 30_000, offsets[-1]).astype(np.int32), offsets]
    return out


def assert_same_batch(a, b) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    assert "input_ids" in a.keys()
    for name in a.keys():
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@SETTINGS
@given(
    n=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    longest=st.sampled_from([3, 200, 1500]),
    part_tokens=st.sampled_from([None, 5_000]),
)
def test_direct_reads_collate_as_in_memory(n, seed, longest, part_tokens, tmp_path_factory):
    arrays = random_columns(n, seed, longest)
    whole = PreferenceDataset.from_arrays(*arrays)
    out = tmp_path_factory.mktemp("store")
    if part_tokens is None:
        whole.save(out)
    else:  # a store of several parts
        writer = StoreWriter(out, part_tokens=part_tokens)
        for start in range(0, n, 37):
            writer.append(*whole.select(np.arange(start, min(n, start + 37)))._store.arrays())
        writer.close()
    direct = PreferenceDataset.load(out, access="direct")
    mapped = PreferenceDataset.load(out, access="mmap")
    assert (direct.access, mapped.access, whole.access) == ("direct", "mmap", "memory")
    rng = np.random.default_rng(seed)
    for layout in LAYOUTS:
        idx = rng.integers(0, n, rng.integers(1, 40))
        want = whole.collate(idx, layout=layout, max_length=2048)
        assert_same_batch(direct.collate(idx, layout=layout, max_length=2048), want)
        assert_same_batch(mapped.collate(idx, layout=layout, max_length=2048), want)


def test_direct_across_concatenation_and_pickling(tmp_path) -> None:
    a, b = (random_columns(50, s, 400) for s in (1, 2))
    on_disk = PreferenceDataset.from_arrays(*a)
    on_disk.save(tmp_path / "a")
    direct = PreferenceDataset.load(tmp_path / "a", access="direct")
    memory = PreferenceDataset.from_arrays(*b)
    joined = PreferenceDataset.concatenate([memory, direct])
    assert joined.access == "direct"
    reference = PreferenceDataset.concatenate([memory, on_disk])
    idx = np.array([0, 99, 50, 49, 51, 3, 75])
    assert_same_batch(joined.collate(idx), reference.collate(idx))
    again = pickle.loads(pickle.dumps(direct))
    assert again.access == "direct"
    assert_same_batch(again.collate(idx[idx < 50]), on_disk.collate(idx[idx < 50]))
    direct.verify()  # a whole-store scan switches the hints and back
    assert direct.fingerprint() == on_disk.fingerprint()


def test_auto_access_and_bound_follow_available_memory(tmp_path, monkeypatch) -> None:
    PreferenceDataset.from_arrays(*random_columns(20, 0, 50)).save(tmp_path)
    size = (tmp_path / "tokens.bin").stat().st_size
    monkeypatch.setattr(rlox.mapped, "available_memory", lambda: 2 * size)
    small = PreferenceDataset.load(tmp_path)
    assert (small.access, small._mapped.max_resident) == ("mmap", None)
    monkeypatch.setattr(rlox.mapped, "available_memory", lambda: 2 * size - 1)
    large = PreferenceDataset.load(tmp_path)
    assert (large.access, large._mapped.max_resident) == ("direct", rlox.mapped.AUTO_RESIDENT)
    assert PreferenceDataset.load(tmp_path, access="mmap").access == "mmap"
    assert PreferenceDataset.load(tmp_path, max_resident=None)._mapped.max_resident is None
    assert PreferenceDataset.load(tmp_path, mmap=False).access == "memory"
    monkeypatch.setattr(rlox.mapped, "available_memory", lambda: None)
    assert PreferenceDataset.load(tmp_path).access == "mmap"


def test_access_option_errors(tmp_path) -> None:
    PreferenceDataset.from_arrays(*random_columns(5, 0, 5)).save(tmp_path)
    with pytest.raises(ValueError, match="access: expected one of"):
        PreferenceDataset.load(tmp_path, access="fast")
    with pytest.raises(ValueError, match="access: 'direct' reads a memory-mapped store"):
        PreferenceDataset.load(tmp_path, mmap=False, access="direct")
    with pytest.raises(ValueError, match="path: .*direct read failed"):
        PreferenceDataset.load(tmp_path)._store.read_direct([(str(tmp_path / "missing"), 0, 1)])


def test_direct_reads_in_forked_loader_workers(tmp_path) -> None:
    """Workers forked after the parent read batches directly build their own I/O threads."""
    import torch

    from rlox.loader import PreferenceBatchSampler, PreferenceCollator

    on_disk = PreferenceDataset.from_arrays(*random_columns(64, 3, 300))
    on_disk.save(tmp_path)
    direct = PreferenceDataset.load(tmp_path, access="direct")
    direct.collate([0, 1])  # the parent's I/O threads exist before the fork
    sampler = PreferenceBatchSampler(direct, batch_size=8, seed=0)
    loader = torch.utils.data.DataLoader(
        direct,
        batch_sampler=sampler,
        collate_fn=PreferenceCollator(direct),
        num_workers=2,
        multiprocessing_context="fork",
        timeout=60,
    )
    batches = list(loader)
    assert len(batches) == len(list(sampler))
    for batch, idx in zip(batches, sampler, strict=True):
        indices = idx.indices if hasattr(idx, "indices") else idx
        assert_same_batch(batch, on_disk.collate(indices))
