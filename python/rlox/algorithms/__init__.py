"""Preference-optimisation algorithms."""

from rlox.algorithms.dpo import DPO

__all__ = ["DPO"]
