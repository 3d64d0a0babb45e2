"""Type stub of the native module ``rlox._rlox`` (Rust, PyO3)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class DPOLossOutput:
    """Results of :func:`dpo_loss`. Arrays have shape (B,) and the dtype of the inputs."""

    @property
    def loss(self) -> float: ...
    @property
    def losses(self) -> npt.NDArray[np.floating]: ...
    @property
    def grad_chosen(self) -> npt.NDArray[np.floating]: ...
    @property
    def grad_rejected(self) -> npt.NDArray[np.floating]: ...
    @property
    def grad_chosen_avg(self) -> npt.NDArray[np.floating] | None: ...
    @property
    def grad_rejected_avg(self) -> npt.NDArray[np.floating] | None: ...
    @property
    def chosen_rewards(self) -> npt.NDArray[np.floating]: ...
    @property
    def rejected_rewards(self) -> npt.NDArray[np.floating]: ...
    @property
    def reward_accuracy(self) -> float: ...
    @property
    def reward_margin(self) -> float: ...
    @property
    def chosen_reward(self) -> float: ...
    @property
    def rejected_reward(self) -> float: ...
    @property
    def component_losses(self) -> dict[str, float]: ...
    @property
    def bco_delta(self) -> float | None: ...

def dpo_loss(
    policy_chosen_logps: npt.NDArray[np.floating],
    policy_rejected_logps: npt.NDArray[np.floating],
    ref_chosen_logps: npt.NDArray[np.floating] | None = None,
    ref_rejected_logps: npt.NDArray[np.floating] | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: npt.NDArray[np.integer] | None = None,
    rejected_lengths: npt.NDArray[np.integer] | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    orpo_alpha: float = 0.1,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    pair_weights: npt.NDArray[np.floating] | None = None,
    sft_mean_length: float | None = None,
) -> DPOLossOutput:
    """Fused loss, gradients, rewards and metrics over (B,) float32/float64 log-prob arrays.

    ``bco_delta``: the ``bco_pair`` reward shift (None: 0, as TRL 1.16); the output's
    ``bco_delta`` is the shift used, None without ``bco_pair``. ``pair_weights``: (B,) weights >= 0 in the log-probs' dtype, multiplying each pair's loss
    (the ``sft`` term: their mean). ``sft_mean_length``: the ``m`` of ``sft``'s ``-pi_c / m``
    (default: the mean chosen length, so the mean over pairs is the batch token mean)."""

def check_loss_options(**options: Any) -> dict[str, Any]:
    """Validate the loss keywords of :func:`dpo_loss`; returns terms, components, needs_lengths,
    needs_reference."""

def collate_pairs(
    prompt: npt.NDArray[np.integer],
    chosen: npt.NDArray[np.integer],
    rejected: npt.NDArray[np.integer],
    *,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, npt.NDArray[np.int64] | npt.NDArray[np.bool_]]:
    """Re-pack (B, P), (B, C), (B, R) ids into the padded layout (see ``PairStore.collate``)."""

class PairStore:
    """Ragged (prompt, chosen, rejected) token columns: flat values plus (n + 1,) offsets each,
    in one or more parts read as one store.

    int32/int64 contiguous arrays are held without copying; construction checks are O(1).
    """

    def __init__(
        self,
        prompt_values: npt.NDArray[np.integer],
        prompt_offsets: npt.NDArray[np.integer],
        chosen_values: npt.NDArray[np.integer],
        chosen_offsets: npt.NDArray[np.integer],
        rejected_values: npt.NDArray[np.integer],
        rejected_offsets: npt.NDArray[np.integer],
    ) -> None: ...
    def __len__(self) -> int: ...
    @staticmethod
    def concat(stores: Sequence[PairStore]) -> PairStore:
        """The stores' parts in order, read as one store (nothing copied)."""
    def arrays(self) -> list[npt.NDArray[np.integer]]:
        """The six arrays in constructor order (a store of one part; else ValueError)."""
    @property
    def prefetch(self) -> bool:
        """Whether scans of all lengths first ask the kernel for every offsets page (mapped
        stores)."""
    @prefetch.setter
    def prefetch(self, on: bool) -> None: ...
    def read_direct(self, files: list[tuple[str, int, int]] | None) -> None:
        """Collate through positioned O_DIRECT reads of these files (``(path, mapped address,
        mapped length)`` per mapped part) instead of the map; None switches back."""
    @property
    def direct(self) -> bool:
        """Whether collation reads token runs with direct reads."""
    def parts(self) -> list[list[npt.NDArray[np.integer]]]:
        """Each part's six arrays, in order."""
    def starts(self) -> npt.NDArray[np.int64]:
        """(parts + 1,) the global index of each part's first pair, then the total."""
    def validate(self, vocab_size: int | None = None) -> None:
        """Check every pair; the ValueError names the field and the first bad pair."""
    def lengths(self) -> list[npt.NDArray[np.int64]]:
        """(n,) prompt, chosen and rejected lengths."""
    def take(self, indices: npt.NDArray[np.integer]) -> list[npt.NDArray[np.integer]]:
        """The rows at ``indices`` as six new compact arrays."""
    def collate(
        self,
        indices: npt.NDArray[np.integer],
        *,
        vocab_size: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Arrays of a collated batch: input_ids, attention_mask, position_ids, loss_mask,
        sequence_ids (R, L); cu_seqlens (S + 1,); segment_ends (B, 3); attn_segments (S, 5);
        pair_index, pair_rows, skipped, prompt/chosen/rejected_lengths (B,); plan_row, plan_position,
        plan_target, plan_pair, plan_side (N,); num_truncated (int).

        Options: layout, max_length, max_prompt_length, truncation, pad_token_id,
        pad_to_multiple_of, pack_length; any other key is a TypeError."""
    def plan(self, **options: Any) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(indices, offsets) of one rank's batches for one epoch. Options: batch_size,
        max_tokens, shuffle, seed, epoch, group_by_length, drop_last, rank, world_size,
        group_batches and the collation options that size a batch."""
    def layout_tokens(
        self,
        indices: npt.NDArray[np.integer],
        offsets: npt.NDArray[np.integer],
        **options: Any,
    ) -> tuple[int, int]:
        """(real tokens, total slots) of collating the given batches (collation options)."""
    def filter(
        self,
        *,
        min_prompt_length: int | None = None,
        max_prompt_length: int | None = None,
        min_completion_length: int | None = None,
        max_completion_length: int | None = None,
        max_length: int | None = None,
        drop_identical: bool = False,
    ) -> tuple[npt.NDArray[np.int64], dict[str, int]]:
        """(kept indices ascending, pairs dropped per reason: prompt_length, completion_length,
        length, identical)."""
    def deduplicate(self) -> npt.NDArray[np.int64]:
        """Indices (ascending) of the first occurrence of each distinct token triple."""
    def checksums(self, chunk: int = ...) -> list[list[int]]:
        """Per column: CRC-32 of its int64 lengths, then of its int64 ids in runs of ``chunk``."""
    def save(self, path: str) -> list[dict[str, Any]]:
        """Write all parts as one token file; returns its sections (name, dtype, offset, count,
        crc32)."""

class TokenEncoder:
    """A Hugging Face tokenizer, loaded from its JSON, that encodes batches on all cores."""

    def __init__(self, json: str) -> None: ...
    def encode(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
        """Ids of ``texts`` without special tokens: values int32 [T], offsets int64 [n + 1]."""

def crc32(array: npt.NDArray[Any]) -> int:
    """CRC-32 of a contiguous array's bytes."""

def flex_blocks(
    attn_segments: npt.NDArray[np.int32],
    rows: int,
    length: int,
    q_block: int = 128,
    kv_block: int = 128,
) -> dict[str, npt.NDArray[np.int32]]:
    """FlexAttention blocks of ``(S, 5)`` attention segments over ``(rows, length)`` tokens.

    ``kv_num_blocks``/``full_kv_num_blocks`` (R, 1, QB) and ``kv_indices``/``full_kv_indices``
    (R, 1, QB, KB), the partial and fully visible key blocks of each query block (as
    ``BlockMask.from_kv_blocks`` takes them); ``seg_start``, ``prefix_start``, ``prefix_end``
    (R, L) per token (padding: its own position). ValueError names ``attn_segments`` and the
    segment index for a segment outside its row, overlapping another or with a prefix that does
    not end before it.
    """
