"""rlox: Rust-accelerated Direct Preference Optimization (DPO) for PyTorch language models."""

from rlox._rlox import DPOLossOutput, __version__, dpo_loss
from rlox.algorithms.dpo import DPO, DPOConfig, PairBatch, collate_pairs, sequence_logps

__all__ = [
    "DPO",
    "DPOConfig",
    "DPOLossOutput",
    "PairBatch",
    "__version__",
    "collate_pairs",
    "dpo_loss",
    "sequence_logps",
]
