"""The training machinery behind :class:`rlox.DPO`: log-probs, the fit loop, the reference
cache, distributed helpers and the option dataclasses."""
