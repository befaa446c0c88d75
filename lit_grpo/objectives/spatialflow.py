"""SpatialFlow-GRPO: region-level credit assignment on top of Flow-GRPO (papers/002).

What changes against Flow-GRPO's objective:
- advantages: a region reward (`lit_grpo.rewards.RegionReward`) scores every region of an
  edit ([N, R], named); each region's scores are normalised within their group (gathered
  across ranks, like the whole-image ones), then mapped onto the latent tokens each region
  covers (`EditPolicy.pixel_to_tokens`): an advantage map [N, T];
- the loss: the clipped ratio per token, on per-token log-probabilities (the per-element
  log-probs of the rollout record, averaged over each token's elements by
  `EditPolicy.latent_to_tokens`), aggregated region by region with `region_weights`
  (`region_weighted_loss`).

Where we depart from the paper, on purpose: its region scores come from a trained reward
model (SFReward); ours from the segmenter's masks (exact on ShapeWorld). The paper summary
does not say what tokens outside every region get (ours: the regions partition the image)
nor how region weights are set (ours: named weights in the config, equal by default; the
names are checked against the region reward's at construction). A row takes part in the
update when its total reward is finite and at least one region the loss weighs (weight > 0)
has spread in its group; a region with no spread in a group gets advantage 0 there. A group
with no spread in any weighed region is counted as zero-spread
(`groups/zero_spread_fraction`) and skipped, KL term included: a segmenter that finds
nothing leaves the edit region empty and its score flat, and such a batch shows as skipped,
not as a step with a loss of exactly 0 (and enough of them in a row stop the run).
`kl_beta` > 0 adds Flow-GRPO's KL to the adapter-off reference (the SFT editor) over the
whole image, per sample; the paper summary names no KL term, so this is ours.
`kl_region_weights` (ours too) confines the KL to regions: per token, aggregated region by
region as the loss is; {others: 1, background: 1} holds the other objects and the
background to the SFT editor and leaves the edit region free. The shipped
`configs/spatialflow.yaml` weighs the loss on {edit: 1} and this KL on {others: 1,
background: 1}: measured on ShapeWorld (docs/benchmarks.md, session 5), the background's
and other objects' own advantages neither held the scene nor let the edit learn as fast,
and the KL did hold it.
"""

import torch
from torch import Tensor

from lit_grpo.objectives.base import (
    Advantages,
    LossInputs,
    LossStats,
    PolicyTargets,
    Ranks,
    gathered_advantages,
)
from lit_grpo.objectives.flow_grpo import (
    FlowGRPO,
    PolicyLossStats,
    clipped_surrogate,
    kl_elements,
)
from lit_grpo.sampling.flow import host_to_device
from lit_grpo.sampling.sde import SDEStep


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
    per_item, ratio = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    with torch.no_grad():
        stats = PolicyLossStats(
            ratio_mean=ratio.mean(),
            clip_fraction=((ratio - 1).abs() > clip_range).float().mean(),
            approx_kl=(0.5 * (log_prob - old_log_prob) ** 2).mean(),
        )
    return per_item, stats


class SpatialFlowGRPO(FlowGRPO):
    """Flow-GRPO with SpatialFlow-GRPO's region-level advantages and region-weighted loss
    (see module docstring). Takes `FlowGRPO`'s arguments, and:

    Args:
        region_reward: the name of the reward whose region scores train (default: the one
            reward that returns regions).
        region_weights: the loss's weight of each region, by the region reward's names
            (`RegionReward`: edit, others, background), e.g. {edit: 1.0}; a region left out
            weighs 0. None: every region weighs 1.
        kl_region_weights: with `kl_beta` > 0, the KL's weight in each region, by name,
            aggregated as the loss is (e.g. {others: 1.0, background: 1.0}); None: the KL
            over the whole image, per sample, as in Flow-GRPO.
    """

    def __init__(
        self,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_std: str = "global",
        adv_clamp: float = 5.0,
        region_reward: str | None = None,
        region_weights: dict[str, float] | None = None,
        kl_region_weights: dict[str, float] | None = None,
    ):
        super().__init__(clip_range, kl_beta, adv_std, adv_clamp)
        for name, weights in (
            ("region_weights", region_weights),
            ("kl_region_weights", kl_region_weights),
        ):
            if weights is not None and not isinstance(weights, dict):
                raise ValueError(
                    f"{name} takes the regions by name, e.g. {{edit: 1.0, others: 0.0, "
                    f"background: 0.0}}; got {weights!r}"
                )
        if region_weights is not None and not any(w > 0 for w in region_weights.values()):
            raise ValueError(
                f"region_weights {region_weights} gives no region a weight > 0: nothing would train"
            )
        self.region_reward = region_reward
        self.region_weights, self.kl_region_weights = region_weights, kl_region_weights

    def check_rewards(self, rewards: list) -> None:
        """The region reward exists and knows every region the weights name (rewards that
        declare their `region_names`; others are checked when they first score)."""
        regional = [r for r in rewards if getattr(r, "region_names", None)]
        names = [r.name for r in regional]
        if self.region_reward is not None and regional and self.region_reward not in names:
            raise ValueError(f"no region reward named {self.region_reward!r}; have {names}")
        for reward in regional:
            if self.region_reward in (None, reward.name):
                self.weights(tuple(reward.region_names))
                return

    def weights(self, names: tuple[str, ...]) -> tuple[list[float], list[float] | None]:
        """(the loss's weights, the KL's weights or None) in the order of `names`."""
        return _by_name(self.region_weights, names, "region_weights"), (
            None
            if self.kl_region_weights is None
            else _by_name(self.kl_region_weights, names, "kl_region_weights")
        )

    def advantages(
        self, scores, group_size: int, ranks: Ranks, policy
    ) -> tuple[Advantages, PolicyTargets]:
        """Per-region group advantages mapped onto the tokens the regions cover."""
        out = self.region_output(scores)
        total, total_values, _ = gathered_advantages(
            scores.total, group_size, ranks, self.normalise
        )
        weights, _ = self.weights(tuple(out.region_names))
        region_adv, region_valid, flat = [], [], []
        for r in range(out.regions.shape[1]):
            gathered, values, valid = gathered_advantages(
                out.regions[:, r], group_size, ranks, self.normalise
            )
            region_adv.append(values)
            if weights[r] > 0:  # a region the loss gives no weight trains nothing
                region_valid.append(valid)
                flat.append(gathered.zero_spread)
        region_adv = torch.stack(region_adv, 1)  # [N, R]
        valid = torch.isfinite(scores.total) & torch.stack(region_valid, 1).any(1)
        zero_spread = torch.stack(flat, 1).all(1)  # [groups of every rank]
        cover = torch.stack(
            [policy.pixel_to_tokens(out.region_masks[:, r]) for r in range(region_adv.shape[1])],
            1,
        )  # [N, R, T]
        tokens = token_advantages(torch.where(valid[:, None], region_adv, 0.0), cover)
        # the rows that train: every rank's, for the loss denominator and the skip decision
        adv = Advantages(total.values, zero_spread, ranks.gather(valid).reshape(-1))
        return adv, PolicyTargets(total_values, valid, tokens=tokens, cover=cover)

    def region_output(self, scores):
        """The region reward's output among `scores.regions`."""
        if not scores.regions:
            raise ValueError(
                "SpatialFlow-GRPO needs a reward that scores regions (lit_grpo.rewards.RegionReward)"
            )
        name = self.region_reward or next(iter(scores.regions))
        if name not in scores.regions:
            raise ValueError(f"no region reward named {name!r}; have {sorted(scores.regions)}")
        self._names = tuple(scores.regions[name].region_names)
        return scores.regions[name]

    def _region_weights(self, kl: bool, device) -> Tensor:
        loss, kl_weights = self.weights(self._names)
        w = kl_weights if kl else loss
        return host_to_device(torch.tensor(w, dtype=torch.float32), device)  # no sync

    def policy_loss(self, inputs: LossInputs, step: SDEStep) -> tuple[Tensor, LossStats]:
        """The per-token clipped loss, aggregated region by region."""
        rows, record, targets = inputs.rows, inputs.record, inputs.targets
        size = tuple(record.images.shape[-2:])
        new = inputs.policy.latent_to_tokens(step.log_prob, size)  # [n, T]
        old = inputs.policy.latent_to_tokens(record.log_prob_elements[rows, inputs.k], size)
        loss, s = region_weighted_loss(
            new,
            old,
            targets.tokens[rows],
            targets.cover[rows],
            self._region_weights(False, new.device),
            self.clip_range,
            inputs.weights,
            targets.denominator,
        )
        return loss, s.with_loss(loss)

    def row_kl(self, inputs: LossInputs, step: SDEStep, ref: SDEStep) -> Tensor:
        """Without `kl_region_weights`, Flow-GRPO's KL over the whole image; with them, the
        per-token KL aggregated over the regions as the loss is."""
        if self.kl_region_weights is None:
            return super().row_kl(inputs, step, ref)
        size = tuple(inputs.record.images.shape[-2:])
        elements = kl_elements(step.mean, ref.mean, step.diffusion)
        per_token = inputs.policy.latent_to_tokens(elements, size)  # [n, T]
        weights = self._region_weights(True, per_token.device)
        return region_mean(per_token, inputs.targets.cover[inputs.rows], weights)


def _by_name(weights: dict[str, float] | None, names: tuple[str, ...], what: str) -> list[float]:
    """`weights` by region name -> a list in the order of `names` (a region left out gets 0;
    None: 1 everywhere). An unknown name is a user error."""
    if weights is None:
        return [1.0] * len(names)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(
            f"{what} names {unknown}, which the region reward does not score; its regions "
            f"are {list(names)}"
        )
    return [float(weights.get(n, 0.0)) for n in names]
