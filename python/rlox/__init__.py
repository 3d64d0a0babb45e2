"""rlox: Rust-accelerated Direct Preference Optimization (DPO) for PyTorch language models."""

from rlox._rlox import DPOLossOutput, __version__, dpo_loss
from rlox.algorithms.dpo import DPO, DPOConfig, FitResult, collate_pairs, sequence_logps
from rlox.data import BatchPlan, PairBatch, PreferenceDataset, dense_attention_mask
from rlox.loader import PreferenceBatchSampler, PreferenceCollator

__all__ = [
    "DPO",
    "BatchPlan",
    "DPOConfig",
    "DPOLossOutput",
    "FitResult",
    "PairBatch",
    "PreferenceBatchSampler",
    "PreferenceCollator",
    "PreferenceDataset",
    "__version__",
    "collate_pairs",
    "dense_attention_mask",
    "dpo_loss",
    "sequence_logps",
]
