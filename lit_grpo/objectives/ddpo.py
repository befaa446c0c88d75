"""DDPO (Black et al. 2023): PPO over the denoising MDP with batch-normalised rewards, the
policy optimisation InstructRL4Pix takes (its introduction cites DDPO's multi-step MDP).

DDPO is Flow-GRPO's update with one difference, the baseline: every denoising step is an
action, the reward comes at the end, and each step's advantage is the final reward
normalised over the whole batch (its mean and std), not within the group of a condition.
The clipped importance ratio per step, no value network, no KL term by default (`kl_beta`
still adds Flow-GRPO's). Per-prompt reward tracking across iterations (DDPO's option) is
not implemented: with each scene seen once per epoch and G < 16, DDPO falls back to the
batch statistics used here.
"""

import torch
from torch import Tensor

from lit_grpo.objectives.base import Advantages
from lit_grpo.objectives.flow_grpo import FlowGRPO


def batch_advantages(
    rewards: Tensor,
    group_size: int,
    clamp: float = 5.0,
    eps: float = 1e-4,
    spread_tol: float = 1e-6,
) -> Advantages:
    """DDPO's advantages (Black et al. 2023): A_i = (r_i - mean(r)) / (std(r) + eps) over the
    whole (gathered) batch, clamped to +-clamp; the baseline is the batch mean, not the
    group's. std is the population std (numpy's, as DDPO's).

    Groups only describe the layout here: a group whose rollouts tie still carries signal
    against the batch mean, so `zero_spread` [B] is all True only when the whole batch has
    no spread (nothing to learn), all False otherwise. Non-finite rewards are dropped from the
    statistics and get advantage 0 (valid False).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * {group_size}], got {tuple(rewards.shape)}")
    r = rewards.double()  # [B * G]
    finite = torch.isfinite(r)
    pooled = r[finite]
    mean = pooled.mean() if pooled.numel() else r.new_zeros(())
    std = pooled.std(unbiased=False) if pooled.numel() > 1 else r.new_zeros(())
    flat = bool(std <= spread_tol)
    adv = ((r - mean) / (std + eps)).clamp(-clamp, clamp)
    valid = finite & (not flat)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    zero_spread = torch.full((r.numel() // group_size,), flat, device=r.device)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return Advantages(adv.to(dtype), zero_spread, valid)


class DDPO(FlowGRPO):
    """Flow-GRPO's clipped loss with DDPO's batch-wide advantages (see module docstring).

    Args:
        clip_range: PPO clip epsilon (DDPO's default 1e-4).
        kl_beta: weight of Flow-GRPO's KL to the reference (DDPO has none: 0).
        adv_clamp: advantages are clamped to +- this (DDPO's adv_clip_max, 5).
    """

    def __init__(self, clip_range: float = 1e-4, kl_beta: float = 0.0, adv_clamp: float = 5.0):
        super().__init__(clip_range, kl_beta, "global", adv_clamp)

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        """The batch mean and std of the gathered rewards [B * G]."""
        return batch_advantages(rewards, group_size, clamp=self.adv_clamp)
