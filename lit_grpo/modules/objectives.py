"""GRPO's pure tensor functions: group advantages, the clipped ratio loss, the KL term,
Neighbor GRPO's two (its softmax-over-distances policy, its quasi-norm advantages), and
DDPO's batch-wide advantages (InstructRL4Pix's PPO).

No Lightning here: each function has an exact-value test (tests/test_objectives.py).
Layout: rollouts of one condition are contiguous, rewards [B * G] = B groups of G.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Advantages:
    """values: [B * G] advantages (0 in skipped groups); zero_spread: [B] groups with no
    reward spread (they carry no signal and are skipped); valid: [B * G] rollouts that count."""

    values: Tensor
    zero_spread: Tensor
    valid: Tensor


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


@dataclass
class PolicyLossStats:
    ratio_mean: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


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
    (e.g. a validity mask) makes it a weighted mean. `denominator` replaces sum(weights) as the normaliser: under DDP, pass
    (valid rows on all ranks) / world so that averaging gradients over ranks gives exactly
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
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_item = torch.maximum(unclipped, clipped)
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
    local_rewards: Tensor, group_size: int, gather, rank: int, fn=group_advantages, **kwargs
) -> tuple[Advantages, Tensor, Tensor]:
    """Group advantages computed on the rewards of every rank, sliced back to this rank.

    `gather(t)` returns every rank's `t` stacked ([world, N]; `t` itself when alone), e.g.
    Lightning's `LightningModule.all_gather`. Every rank then normalises the same numbers, so
    the "global" std and the skip decisions agree across ranks and with a single process.
    Ranks hold whole groups (a condition's G rollouts never straddle ranks). `fn` is the
    per-group normalisation (`group_advantages`, or `quasi_norm_advantages`).
    Returns (advantages of all ranks, this rank's values [N], this rank's valid mask [N]).
    """
    gathered = gather(local_rewards)
    flat = gathered.reshape(-1)
    adv = fn(flat, group_size, **kwargs)
    n = local_rewards.shape[0]
    r = rank if gathered.ndim > local_rewards.ndim else 0
    return adv, adv.values[r * n : (r + 1) * n], adv.valid[r * n : (r + 1) * n]


# --- region-level credit (SpatialFlow-GRPO) ------------------------------------------------
def token_advantages(region_adv: Tensor, cover: Tensor) -> Tensor:
    """Per-token advantages [N, T]: each token takes the advantages of the regions it covers,
    weighted by how much of it each covers (regions [N, R] advantages, cover [N, R, T]
    fractions). A token no region covers gets 0 (our choice: no credit where no region
    speaks; the region rewards here partition the image, so every token is covered)."""
    if region_adv.shape != cover.shape[:2]:
        raise ValueError(
            f"region advantages {tuple(region_adv.shape)} do not match cover {tuple(cover.shape)}"
        )
    total = cover.sum(1)  # [N, T]
    weighted = (region_adv[:, :, None] * cover).sum(1)
    return torch.where(total > 0, weighted / total.clamp_min(1e-8), torch.zeros_like(weighted))


def region_weighted_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    cover: Tensor,
    region_weights: Tensor,
    clip_range: float,
    row_weights: Tensor | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """SpatialFlow-GRPO's region-weighted aggregation of the per-token clipped loss.

    log_prob, old_log_prob, advantages: [N, T] per token; cover: [N, R, T] region fractions;
    region_weights: [R]. Per token: max(-A * ratio, -A * clamp(ratio, 1 - e, 1 + e)); per
    region: the cover-weighted mean over its tokens; per row: the `region_weights`-weighted
    mean over the regions present in it (so a small edit region counts as much as a large
    background, by weight, not by size: our reading of "region-weighted aggregation"); then
    the `row_weights`-weighted sum over rows divided by `denominator` (as
    `clipped_policy_loss`).
    """
    per_token, stats = _clipped_terms(log_prob, old_log_prob, advantages, clip_range)
    per_row = region_mean(per_token, cover, region_weights)  # [N]
    rw = torch.ones_like(per_row) if row_weights is None else row_weights.to(per_row)
    norm = rw.sum() if denominator is None else torch.as_tensor(denominator).to(per_row)
    return (per_row * rw).sum() / norm.clamp_min(1e-8), stats


def region_mean(per_token: Tensor, cover: Tensor, region_weights: Tensor) -> Tensor:
    """Per row [N]: the `region_weights`-weighted mean, over the regions present in the row,
    of each region's cover-weighted mean over its tokens (per_token [N, T], cover [N, R, T],
    region_weights [R]). The aggregation of `region_weighted_loss` and of the region KL."""
    if cover.shape[0] != per_token.shape[0] or cover.shape[2] != per_token.shape[1]:
        raise ValueError(
            f"cover {tuple(cover.shape)} does not match tokens {tuple(per_token.shape)}"
        )
    size = cover.sum(-1)  # [N, R]
    per_region = (cover * per_token[:, None]).sum(-1) / size.clamp_min(1e-8)
    w = region_weights.to(per_region)[None] * (size > 0)  # [N, R]
    return (w * per_region).sum(-1) / w.sum(-1).clamp_min(1e-8)


def _clipped_terms(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, PolicyLossStats]:
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
            f"advantages {tuple(advantages.shape)} must have one shape"
        )
    ratio = torch.exp(log_prob - old_log_prob)
    per_item = torch.maximum(
        -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    )
    with torch.no_grad():
        stats = PolicyLossStats(
            ratio_mean=ratio.mean(),
            clip_fraction=((ratio - 1).abs() > clip_range).float().mean(),
            approx_kl=(0.5 * (log_prob - old_log_prob) ** 2).mean(),
        )
    return per_item, stats


def quasi_norm_advantages(
    rewards: Tensor,
    group_size: int,
    p: float = 0.8,
    clamp: float = 5.0,
    eps: float = 1e-4,
    spread_tol: float = 1e-6,
) -> Advantages:
    """Neighbor GRPO's group-wise quasi-norm reweighting (arXiv 2511.16955, eq. 11):

        c_i = r_i - mean_group(r),   A_i = c_i / (||c||_p / sqrt(G) + eps),   clamped

    with ||c||_p = (sum_k |c_k|^p)^(1/p) over the group. The paper writes A_i / ||A||_p and
    leaves the scale open; we scale by sqrt(G) so that p = 2 is exactly GRPO's per-group
    z-score (`group_advantages(std="group")`). With p < 2 the norm grows when the spread is
    shared evenly among many rollouts (a flat group with small differences everywhere)
    relative to one where few stand out, which damps the updates of reward-flat groups
    (the paper's "reward flattening"; p = 0.8 is its best setting). Non-finite rewards and
    zero-spread groups are handled as in `group_advantages` (G counts the finite rollouts).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * {group_size}], got {tuple(rewards.shape)}")
    if not 0.0 < p <= 2.0:
        raise ValueError(f"p must be in (0, 2], got {p}")
    r = rewards.double().view(-1, group_size)  # [B, G]
    finite = torch.isfinite(r)
    count = finite.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(finite, r, torch.zeros_like(r)).sum(1, keepdim=True) / count
    centred = torch.where(finite, r - mean, torch.zeros_like(r))
    norm = (centred.abs() ** p).sum(1, keepdim=True) ** (1 / p)  # [B, 1]
    adv = (centred / (norm / count.sqrt() + eps)).clamp(-clamp, clamp)
    group_std = ((centred**2).sum(1) / count.squeeze(1)).sqrt()
    zero_spread = (group_std <= spread_tol) | (finite.sum(1) < 2)
    valid = finite & ~zero_spread[:, None]
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return Advantages(adv.flatten().to(dtype), zero_spread, valid.flatten())


def neighbor_log_probs(anchor: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """Neighbor GRPO's surrogate leaping policy (arXiv 2511.16955, eq. 8): the log-probability
    that the anchor's step lands on each candidate of its group,

        log pi(i | anchor) = log_softmax_i( -d_i / temperature ),
        d_i = mean over elements of (x_i - x_anchor)^2

    anchor [n, ...] (the anchor's next state as the policy predicts it), candidates
    [n, G, ...] (the group's recorded states at the same step) -> [n, G].

    The paper uses the squared L2 norm with no temperature, i.e. our mean with temperature
    1 / D (D elements per sample); the mean and an explicit temperature keep one setting
    meaningful across image sizes (the paper names no temperature; choosing it is ours).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if candidates.shape[0] != anchor.shape[0] or candidates.shape[2:] != anchor.shape[1:]:
        raise ValueError(
            f"candidates must be [n, G, *anchor.shape[1:]], got {tuple(candidates.shape)} "
            f"for anchors {tuple(anchor.shape)}"
        )
    d = ((candidates.float() - anchor.float()[:, None]) ** 2).flatten(2).mean(2)  # [n, G]
    return torch.log_softmax(-d / temperature, dim=1)
