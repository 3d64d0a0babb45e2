"""Reference log-probs computed once: the cache next to a store, its key and the weights digest.

:func:`precompute` runs the reference over a dataset and keeps the per-pair sums on the dataset
and in ``<store>/reference_logps/<key>.npy`` (+ ``.json``). :func:`find_cached` gives the cached
values that match a trainer's reference weights, the data and the truncation settings. The
weights are hashed once per ``fit`` / ``evaluate`` / ``precompute_reference`` call
(:class:`ReferenceWeights`), never remembered between calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlox import __version__, _rlox
from rlox.data import PairBatch, PreferenceDataset
from rlox.train.config import ReferenceConfig
from rlox.train.distributed import full_tensor, process_group, rank_world
from rlox.train.logps import stand_in_batch
from rlox.train.protocol import Trainer

__all__ = [
    "CachedReference",
    "ReferenceLogps",
    "ReferenceWeights",
    "find_cached",
    "precompute",
    "reference_settings",
    "weights_digest",
]

REFERENCE_DIR = "reference_logps"
REFERENCE_FORMAT = "rlox-reference-logps"


class ReferenceLogps(NamedTuple):
    """Reference log-prob sums of every pair of a dataset (see :meth:`DPO.precompute_reference`)."""

    chosen: np.ndarray
    """(n,) float64; NaN for pairs that truncation drops."""
    rejected: np.ndarray
    """(n,) float64."""
    key: dict[str, Any]
    """What the values depend on: reference weights, data, truncation settings, ld_alpha."""
    path: Path | None
    """The ``.npy`` file next to the store, or None for an in-memory dataset."""


class CachedReference:
    """Reads a batch's (2B,) reference log-probs from per-pair cached values."""

    def __init__(self, logps: np.ndarray) -> None:
        self.logps = torch.from_numpy(np.ascontiguousarray(logps, dtype=np.float64))

    def __call__(self, batch: PairBatch) -> Tensor:
        if batch.pair_index is None:
            raise ValueError("batch: cached reference log-probs need batches from dataset.collate")
        idx = batch.pair_index.cpu()
        return torch.cat([self.logps[0, idx], self.logps[1, idx]]).float()


def weights_digest(module: nn.Module, *, frozen_only: bool = False) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s parameters and buffers.

    ``frozen_only`` skips parameters with ``requires_grad`` (a peft model's adapters). Sharded
    (DTensor) tensors are hashed whole, so every rank of a sharded module gets the digest of the
    unsharded one (a collective: every rank must call it).
    """
    digest = hashlib.sha256()
    named = [*module.named_parameters(remove_duplicate=False)]
    named += module.named_buffers(remove_duplicate=False)
    for name, t in named:
        if frozen_only and isinstance(t, nn.Parameter) and t.requires_grad:
            continue
        data = full_tensor(t.detach()).cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(t.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


class ReferenceWeights:
    """The digest of a reference's weights, hashed at most once within a :meth:`hashed_once` block.

    ``source()`` gives (module, frozen_only): the reference model, or a peft policy whose
    frozen weights are its reference. Outside blocks nothing is remembered, so every call hashes
    afresh and no edit (``.data`` writes, dtype round trips, swapped tensors) leaves a stale
    digest. Code that writes the reference inside a block must reset ``_cached`` to None.
    """

    def __init__(self, source: Callable[[], tuple[nn.Module, bool]]) -> None:
        self._source = source
        self._cached: str | None = None
        self._depth = 0

    @contextlib.contextmanager
    def hashed_once(self) -> Iterator[None]:
        """A block (nestable) within which the weights are hashed at most once."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._cached = None

    def digest(self) -> str:
        """:func:`weights_digest` of the reference."""
        if self._depth and self._cached is not None:
            return self._cached
        module, frozen = self._source()
        digest = weights_digest(module, frozen_only=frozen)
        if self._depth:
            self._cached = digest
        return digest


def reference_settings(data_kw: dict[str, Any], ld_alpha: float | None) -> dict[str, Any]:
    """The truncation settings (and ``ld_alpha``) that cached log-probs depend on."""
    return {
        "max_length": data_kw["max_length"],
        "max_prompt_length": data_kw["max_prompt_length"],
        "truncation": data_kw["truncation"],
        "ld_alpha": ld_alpha,
    }


def find_cached(
    dataset: PreferenceDataset,
    settings: dict[str, Any],
    weights: ReferenceWeights | None,
) -> CachedReference | None:
    """Cached reference log-probs of ``dataset`` for ``settings`` and ``weights``, else None.

    ``weights`` is None when there is no reference to run (and so none to check): the newest
    matching cache is then used, and finding none raises ``ValueError``. Caches of other data or
    other weights are ignored with a warning.
    """
    live = weights is not None
    entries = reference_entries(dataset)
    if not entries and live:
        return None
    fingerprint = dataset.fingerprint() if entries else None
    digest = weights.digest() if weights is not None and entries else None
    same = [e for e in entries if e["key"]["settings"] == settings]
    match = [
        e for e in same if e["key"]["data"] == fingerprint and digest in (None, e["key"]["weights"])
    ]
    if match:
        if len({e["key"]["weights"] for e in match}) > 1:
            warnings.warn(
                f"dataset: reference log-probs of several reference models are cached for "
                f"{dataset!r}; using the newest",
                UserWarning,
                stacklevel=4,
            )
        entry = max(match, key=lambda e: e["created"])
        values = _load_reference(dataset, entry)
        if values is not None:
            return CachedReference(values)
    elif same:
        stale = {"data" if e["key"]["data"] != fingerprint else "reference weights" for e in same}
        warnings.warn(
            f"dataset: cached reference log-probs of {dataset!r} were computed for other "
            f"{' and '.join(sorted(stale))}; ignored",
            UserWarning,
            stacklevel=4,
        )
    if live:
        return None
    raise ValueError(
        f"ref_model: no precomputed reference log-probs match {dataset!r} with {settings}; "
        "run DPO.precompute_reference on it with a reference model and these settings"
    )


def precompute(
    trainer: Trainer, dataset: PreferenceDataset, config: ReferenceConfig
) -> ReferenceLogps:
    """Run ``trainer``'s reference over ``dataset``; keep and return the per-pair sums.

    Under ``torch.distributed`` each rank scores its share and the values are all-reduced; only
    rank 0 writes the files.
    """
    data_kw = config.data_kwargs()
    rank, world = rank_world()
    plan = dataset.batches(shuffle=False, rank=rank, world_size=world, **config.plan_kwargs())
    collate_kw = trainer._collate_kwargs(data_kw)
    n = len(dataset)
    logps = torch.zeros(2, n, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.float64)
    previous = trainer._autocast
    trainer._autocast = config.autocast
    try:
        for idx in tqdm(plan, desc="reference", disable=not (config.progress and rank == 0)):
            batch = dataset.collate(idx, **collate_kw)
            b = batch.num_pairs
            if b == 0:
                if process_group() is not None:  # a sharded reference gathers in every forward
                    trainer._reference_logps(stand_in_batch())
                continue
            ref = trainer._reference_logps(batch).detach().double().cpu()
            where = batch.pair_index.cpu()
            logps[0, where] = ref[:b]
            logps[1, where] = ref[b:]
            seen[where] = 1.0
    finally:
        trainer._autocast = previous
    dist = process_group()
    if dist is not None:
        device = next(trainer.model.parameters()).device
        both = torch.cat([logps.reshape(-1), seen]).to(device)
        dist.all_reduce(both)
        both = both.cpu()
        logps, seen = both[: 2 * n].reshape(2, n), both[2 * n :]
    logps[:, seen == 0] = math.nan
    key = {
        "format": REFERENCE_FORMAT,
        "weights": trainer._reference_weights.digest(),
        "data": dataset.fingerprint(),
        "settings": reference_settings(data_kw, trainer.config.ld_alpha),
    }
    values = logps.numpy()
    path = store_reference(dataset, key, values, write=rank == 0)
    return ReferenceLogps(values[0], values[1], key, path)


def _reference_dir(dataset: PreferenceDataset) -> Path | None:
    return None if dataset.directory is None else dataset.directory / REFERENCE_DIR


def _entry_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def store_reference(
    dataset: PreferenceDataset, key: dict[str, Any], values: np.ndarray, *, write: bool
) -> Path | None:
    """Keep (2, n) reference log-probs on ``dataset`` and, when it has a directory, on disk."""
    digest = _entry_digest(key)
    values = np.ascontiguousarray(values, dtype=np.float64)
    entry = {
        "key": key,
        "digest": digest,
        "created": time.time(),
        "num_pairs": int(values.shape[1]),
        "crc32": int(_rlox.crc32(values.reshape(-1).view(np.uint8))),
        "rlox_version": __version__,
    }
    dataset._reference_logps[digest] = dict(entry, values=values)
    folder = _reference_dir(dataset)
    if folder is None:
        return None
    path = folder / f"{digest}.npy"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp_npy, tmp_json = folder / f".{digest}.{tag}.npy", folder / f".{digest}.{tag}.json"
        try:
            with open(tmp_npy, "wb") as f:
                np.save(f, values, allow_pickle=False)
            tmp_json.write_text(json.dumps(entry, indent=1))
            os.replace(tmp_npy, path)
            os.replace(tmp_json, folder / f"{digest}.json")
        finally:
            tmp_npy.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
    return path


def reference_entries(dataset: PreferenceDataset) -> list[dict[str, Any]]:
    """Cache entries of ``dataset``: in memory, then those on disk next to its store."""
    entries = {d: e for d, e in dataset._reference_logps.items()}
    folder = _reference_dir(dataset)
    if folder is not None and folder.is_dir():
        for meta_file in folder.glob("*.json"):
            if meta_file.stem in entries:
                continue
            try:
                entry = json.loads(meta_file.read_text())
                if entry["key"]["format"] == REFERENCE_FORMAT and entry["digest"] == meta_file.stem:
                    entries[meta_file.stem] = entry
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return [e for e in entries.values() if e.get("num_pairs") == len(dataset)]


def _load_reference(dataset: PreferenceDataset, entry: dict[str, Any]) -> np.ndarray | None:
    if "values" in entry:
        return entry["values"]
    folder = _reference_dir(dataset)
    assert folder is not None
    try:
        values = np.load(folder / f"{entry['digest']}.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        warnings.warn(f"dataset: unreadable reference log-prob cache ({e}); ignored", stacklevel=4)
        return None
    ok = values.dtype == np.float64 and values.shape == (2, entry["num_pairs"])
    if (
        not ok
        or int(_rlox.crc32(np.ascontiguousarray(values).reshape(-1).view(np.uint8)))
        != entry["crc32"]
    ):
        warnings.warn(
            f"dataset: reference log-prob cache {entry['digest']} is corrupted; ignored",
            stacklevel=4,
        )
        return None
    dataset._reference_logps[entry["digest"]] = dict(entry, values=values)
    return values
