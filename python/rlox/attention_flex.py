"""FlexAttention ``BlockMask`` of a packed or prefix-shared batch, built from Rust-made blocks.

The Rust core (``_rlox.flex_blocks``) reads the batch's ``attn_segments`` and lists, per row and
query block, the key blocks every query of the block sees (full) and those it sees in part; the
mask function runs only on the partial ones. No dense ``(L, L)`` mask is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlox import _rlox
from rlox.batch import PairBatch

__all__ = ["block_mask"]


def block_mask(batch: PairBatch, block_size: int = 128) -> Any:
    """A ``torch.nn.attention.flex_attention.BlockMask`` for ``batch`` (packed/prefix_shared).

    Query ``q`` of row ``b`` sees key ``kv`` when ``kv`` lies in ``q``'s segment at or before
    ``q``, or in that segment's prefix (:attr:`PairBatch.attn_segments`); padding sees itself.
    ``block_size`` is FlexAttention's ``BLOCK_SIZE`` for queries and keys.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if batch.attn_segments is None:
        raise ValueError(f"batch: the {batch.layout} layout has no attn_segments for a BlockMask")
    rows, length = batch.input_ids.shape
    segments = np.ascontiguousarray(batch.attn_segments.cpu().numpy(), dtype=np.int32)
    arrays = _rlox.flex_blocks(segments, rows, length, block_size, block_size)
    device = batch.input_ids.device
    t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    seg_start, prefix_start, prefix_end = t["seg_start"], t["prefix_start"], t["prefix_end"]

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        own = (kv >= seg_start[b, q]) & (kv <= q)
        return own | ((kv >= prefix_start[b, q]) & (kv < prefix_end[b, q]))

    return BlockMask.from_kv_blocks(
        t["kv_num_blocks"],
        t["kv_indices"],
        t["full_kv_num_blocks"],
        t["full_kv_indices"],
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )
