"""Type stub of the native module ``rlox._rlox`` (Rust, PyO3)."""

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

def dpo_loss(
    policy_chosen_logps: npt.NDArray[np.floating],
    policy_rejected_logps: npt.NDArray[np.floating],
    ref_chosen_logps: npt.NDArray[np.floating],
    ref_rejected_logps: npt.NDArray[np.floating],
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: npt.NDArray[np.integer] | None = None,
    rejected_lengths: npt.NDArray[np.integer] | None = None,
) -> DPOLossOutput:
    """Fused loss, gradients, rewards and metrics over four (B,) float32/float64 arrays."""

def collate_pairs(
    prompt: npt.NDArray[np.integer],
    chosen: npt.NDArray[np.integer],
    rejected: npt.NDArray[np.integer],
    *,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, npt.NDArray[np.int64] | npt.NDArray[np.bool_]]:
    """Re-pack (B, P), (B, C), (B, R) ids into (2B, L) arrays, masks, lengths and gather plan.

    Keys: input_ids, attention_mask, position_ids, loss_mask (2B, L); prompt_lengths,
    chosen_lengths, rejected_lengths (B,); plan_row, plan_position, plan_target (N,).
    """
