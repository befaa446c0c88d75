"""Flow-GRPO (Liu et al. 2025): group-relative advantages, the clipped ratio loss on each
trained SDE step's log-probability, and the KL to the reference. The Talk2Move core.

    A_i   = (r_i - mean_group(r)) / (std + 1e-4), clamped       std: "global" or "group"
    ratio = exp(logp_new - logp_old)                             per sample, mean over elements
    loss  = mean(max(-A ratio, -A clamp(ratio, 1 - e, 1 + e))) + beta KL(theta || reference)

Pure torch; each function has an exact-value test (tests/test_objectives.py). Layout:
rollouts of one condition are contiguous, rewards [B * G] = B groups of G.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_grpo.objectives.base import (
    Advantages,
    LossInputs,
    LossStats,
    Objective,
    Ranks,
    gathered_advantages,
)
from lit_grpo.sampling.sde import SDEStep, reduce_log_prob


def group_advantages(
    rewards: Tensor,
    group_size: int,
    std: str = "global",
    clamp: float = 5.0,
    eps: float = 1e-4,
    spread_tol: float = 1e-6,
) -> Advantages:
    """A_i = (r_i - mean_group(r)) / (std + eps), clamped to +-clamp.

    std "group" divides by each group's own std; "global" (the Flow-GRPO default) by the std
    of all rewards gathered, which keeps low-variance groups from being blown up. Non-finite
    rewards are dropped from their group's statistics and get advantage 0 (valid False).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * {group_size}], got {tuple(rewards.shape)}")
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    r = rewards.double().view(-1, group_size)  # [B, G]
    finite = torch.isfinite(r)
    count = finite.sum(1, keepdim=True)
    r0 = torch.where(finite, r, torch.zeros_like(r))
    mean = r0.sum(1, keepdim=True) / count.clamp_min(1)
    centred = torch.where(finite, r - mean, torch.zeros_like(r))
    group_var = (centred**2).sum(1, keepdim=True) / count.clamp_min(1)
    zero_spread = (group_var.squeeze(1).sqrt() <= spread_tol) | (count.squeeze(1) < 2)
    if std == "group":
        denom = group_var.sqrt()
    else:
        # the std of every finite reward, as tensor ops (a boolean index or a branch on the
        # count would read back from the device: a host sync)
        n = finite.sum()
        pooled_mean = r0.sum() / n.clamp_min(1)
        pooled_var = (torch.where(finite, r - pooled_mean, 0.0) ** 2).sum() / n.clamp_min(1)
        denom = torch.where(n > 1, pooled_var.sqrt(), 0.0)
    adv = (centred / (denom + eps)).clamp(-clamp, clamp)
    valid = finite & ~zero_spread[:, None]
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return Advantages(
        adv.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32),
        zero_spread,
        valid.flatten(),
    )


@dataclass
class PolicyLossStats:
    """The clipped loss's statistics, over the weighted items (detached)."""

    ratio_mean: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor

    def with_loss(self, loss: Tensor) -> LossStats:
        """These as the `LossStats` of a loss term."""
        return LossStats(loss.detach(), self.approx_kl, self.clip_fraction, self.ratio_mean)


def clipped_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    weights: Tensor | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO/GRPO clipped surrogate: mean(max(-A * ratio, -A * clamp(ratio, 1 - e, 1 + e))).

    `log_prob`, `old_log_prob`, `advantages` (and `weights`, if given) must have one shape:
    [N] per rollout, or [N, T] per token for region methods. A mismatch raises: torch would
    broadcast an [N] advantage against [N, T] log-probs along the wrong axis. `weights`
    (e.g. a validity mask) makes it a weighted mean. `denominator` replaces sum(weights) as
    the normaliser: under DDP, pass (valid rows on all ranks) / world so that averaging gradients over ranks gives exactly
    the single-process loss even when ranks hold different numbers of valid rows.
    """
    shapes = {"log_prob": log_prob.shape, "old_log_prob": old_log_prob.shape}
    shapes["advantages"] = advantages.shape
    if weights is not None:
        shapes["weights"] = weights.shape
    if len(set(shapes.values())) > 1:
        raise ValueError(
            "clipped_policy_loss needs inputs of one shape, got "
            + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
            + "; expand per-rollout values to per-token ones explicitly"
        )
    per_item, ratio = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    w = torch.ones_like(per_item) if weights is None else weights.to(per_item)
    total = w.sum().clamp_min(1e-8)
    norm = total if denominator is None else torch.as_tensor(denominator).to(total).clamp_min(1e-8)
    loss = (per_item * w).sum() / norm
    with torch.no_grad():
        stats = PolicyLossStats(
            ratio_mean=(ratio * w).sum() / total,
            clip_fraction=(((ratio - 1).abs() > clip_range).float() * w).sum() / total,
            approx_kl=(0.5 * (log_prob - old_log_prob) ** 2 * w).sum() / total,
        )
    return loss, stats


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """Per item (any one shape): max(-A * ratio, -A * clamp(ratio, 1 - e, 1 + e)), and the
    ratio exp(log_prob - old_log_prob)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped), ratio


def kl_to_reference(mean: Tensor, ref_mean: Tensor, diffusion: Tensor) -> Tensor:
    """Flow-GRPO's KL term between the policy's and the reference's step means, per sample [N]:
    mean over elements of (mean - ref_mean)^2 / (2 diffusion^2).

    `diffusion` is the sigma-level std of the SDE (`SDEStep.diffusion`, `sde_std`), without
    the sqrt(-dt) factor, as in the Flow-GRPO reference code: beta values carry over from
    it. The exact Gaussian KL of the step divides by the step's variance
    (diffusion^2 * (-dt)) instead, i.e. it is this value / (-dt) (10x at 10 uniform steps):
    a beta tuned on the exact KL converts to this one by multiplying it by 1 / (-dt).
    """
    return kl_elements(mean, ref_mean, diffusion).flatten(1).mean(1)


def kl_elements(mean: Tensor, ref_mean: Tensor, diffusion: Tensor) -> Tensor:
    """`kl_to_reference` before the mean over elements: (mean - ref_mean)^2 / (2 diffusion^2)
    per element, shaped as `mean` ([N, ...]; `diffusion` [N] or one value per row)."""
    sq = (mean.float() - ref_mean.float()) ** 2
    sigma = diffusion.float().flatten().view(-1, *([1] * (sq.ndim - 1)))
    return sq / (2 * sigma**2)


def gathered_group_advantages(
    local_rewards: Tensor, group_size: int, gather, rank: int, fn=None, **kwargs
) -> tuple[Advantages, Tensor, Tensor]:
    """`objectives.base.gathered_advantages` with `gather` and `rank` spelled out and GRPO's
    `group_advantages` by default (`fn`): (advantages of all ranks, this rank's values [N],
    this rank's valid mask [N])."""
    fn = fn or group_advantages
    return gathered_advantages(local_rewards, group_size, Ranks(gather, rank), fn, **kwargs)


class FlowGRPO(Objective):
    """Flow-GRPO's objective (see module docstring).

    Args:
        clip_range: PPO clip epsilon (Talk2Move: 2e-4; Flow-GRPO's default 1e-4).
        kl_beta: weight of the KL to the reference, on Flow-GRPO's scale (beta values from
            Flow-GRPO carry over; see `kl_to_reference`). > 0 needs a LoRA adapter (the
            reference is the adapter-off view).
        adv_std: "global" (Flow-GRPO) or "group" advantage normalisation.
        adv_clamp: advantages are clamped to +- this.
    """

    def __init__(
        self,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_std: str = "global",
        adv_clamp: float = 5.0,
    ):
        if adv_std not in ("group", "global"):
            raise ValueError(f"adv_std must be 'group' or 'global', got {adv_std!r}")
        self.clip_range, self.kl_beta = clip_range, kl_beta
        self.adv_std, self.adv_clamp = adv_std, adv_clamp

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        return group_advantages(rewards, group_size, std=self.adv_std, clamp=self.adv_clamp)

    def loss(self, inputs: LossInputs) -> tuple[Tensor, LossStats]:
        """The clipped ratio loss of stored step k on the rows (+ beta x the KL)."""
        step = inputs.rescore()
        loss, stats = self.policy_loss(inputs, step)
        if self.kl_beta > 0:
            kl = inputs.per_row_sum(self.row_kl(inputs, step, inputs.rescore_reference()))
            loss = loss + self.kl_beta * kl
            stats.loss, stats.kl = loss.detach(), kl.detach()
        return loss, stats

    def policy_loss(self, inputs: LossInputs, step: SDEStep) -> tuple[Tensor, LossStats]:
        """The clipped ratio loss of `step` (the rescored stored step) on the valid rows."""
        rows, record = inputs.rows, inputs.record
        log_prob = self.reduce(step.log_prob, inputs)  # [n]
        old = self.reduce(record.log_prob_elements[rows, inputs.k], inputs)  # [n]
        loss, s = clipped_policy_loss(
            log_prob,
            old,
            inputs.targets.advantages[rows],
            self.clip_range,
            inputs.weights,
            inputs.targets.denominator,
        )
        return loss, s.with_loss(loss)

    def reduce(self, elements: Tensor, inputs: LossInputs) -> Tensor:
        """Per-element log-probs [n, C, h, w] -> per sample [n]: the mean over every element
        (the reference code's reduction; the clip range is tuned to it)."""
        return reduce_log_prob(elements, "mean")

    def row_kl(self, inputs: LossInputs, step: SDEStep, ref: SDEStep) -> Tensor:
        """The KL of each row [n] between the step's means and the reference's, over every
        element."""
        return kl_to_reference(step.mean, ref.mean, step.diffusion)
