"""The typed container that carries rollouts from sampling to scoring to the update."""

from dataclasses import dataclass

from torch import Tensor

from lit_grpo.policies.base import Condition


@dataclass
class Rollout:
    """G rollouts for each of B conditions, N = B * G rows (a group's rows are contiguous).

    condition:     the encoded condition, repeated per rollout
    states:        [N, K, C, h, w] latents entering each trained SDE step
    next_states:   [N, K, C, h, w] the latents those steps sampled
    log_probs:     [N, K] log-probabilities of the sampled steps (old policy, float32)
    sigmas:        [K] noise level of each trained step;  sigma_next: [K] the level after it
    sigma_max:     the schedule's second sigma (the SDE std's denominator at sigma = 1)
    images:        [N, 3, H, W] decoded edits in [0, 1]
    rewards:       [N] weighted total reward (NaN: could not be scored)
    advantages:    [N] group-normalised advantages (0 where not valid)
    valid:         [N] bool, rows that train
    loss_denominator: the normaliser of the per-minibatch loss (see GRPOModule.update)
    """

    condition: Condition
    states: Tensor
    next_states: Tensor
    log_probs: Tensor
    sigmas: Tensor
    sigma_next: Tensor
    sigma_max: Tensor
    images: Tensor
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    valid: Tensor | None = None
    loss_denominator: float = 1.0

    def __len__(self) -> int:
        return self.states.shape[0]
