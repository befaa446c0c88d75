"""SpatialFlow-GRPO: region-level credit assignment on top of Flow-GRPO (papers/002).

What changes against Flow-GRPO's objective:
- advantages: a region reward (`lit_grpo.rewards.RegionReward`) scores every region of an
  edit ([N, R], named); each region's scores are normalised within their group (gathered
  across ranks, like the whole-image ones): region advantages [N, R], with the cover of each
  region on the latent tokens (`EditPolicy.pixel_to_tokens`: [N, R, T], the fraction of
  each token's pixels in the region);
- the loss: the clipped ratio per token, on per-token log-probabilities (the per-element
  log-probs of the rollout record, averaged over each token's elements by
  `EditPolicy.latent_to_tokens`), aggregated region by region with `region_weights`
  (`region_weighted_loss`).

Tokens that straddle regions (ours; the paper summary says region advantages are "aligned
with latent positions" and nothing about a token two regions share). A token is a 4x4-pixel
patch with one log-probability, and the regions partition pixels, so an object's edge token
is partly edit region, partly background. Our rule apportions: region r's loss is the mean,
over r's pixels, of the clipped surrogate at r's own advantage on the log-prob of the token
holding the pixel; per token, the term of region r is `clipped(ratio, A_r)` weighted by
`cover_r * region_weight_r`. A region of weight 0 never enters the loss nor its gradient
(its advantages are not read), so `region_weights {edit: 1, others: 0, background: 0}`
trains on the edit's advantage alone, and a token the edit covers in part is pushed by it in
proportion to that part. Why not the alternatives:
- the earlier rule (until issue 23) gave each token one advantage, the cover-weighted blend
  of its regions' (`sum_r cover_r A_r`), and averaged each region over the tokens it
  touches: a zero-weight region's advantage still reached the gradient through the blend.
  On a 9x9-pixel edit region (8 of its 9 tokens partly background, 80% of its cover), with
  the edit's advantage +1 and weights [1, 0, 0], background advantages 0, +2, -2 gave
  losses -0.649, -1.351, +0.053 and flipped an edge token's gradient; now -1 in each case;
- exclusive assignment (each token to the region covering most of it, or to the edit region
  when it touches it) needs a threshold and a tie rule, drops a region's thin parts (a
  region under half of every token it touches gets no token) or hands a region's pixels to
  another's advantage, and changes the loss when a mask moves by a pixel.
With 0/1 covers (every token inside one region) this rule and the earlier one agree.
`token_credit` gives the push each token gets at ratio 1.

Where we depart from the paper, on purpose: its region scores come from a trained reward
model (SFReward); ours from the segmenter's masks (exact on ShapeWorld). The paper summary
does not say what tokens outside every region get (ours: the regions partition the image;
a token no region covers gets no loss) nor how region weights are set (ours: named weights
in the config, equal by default; the names are checked against the region reward's at
construction). A row takes part in the update when its total reward is finite and at least
one region the loss weighs (weight > 0) has spread in its group; a region with no spread in
a group gets advantage 0 there. A group with no spread in any weighed region is counted as
zero-spread (`groups/zero_spread_fraction`) and skipped, KL term included: a segmenter that finds
nothing leaves the edit region empty and its score flat, and such a batch shows as skipped,
not as a step with a loss of exactly 0 (and enough of them in a row stop the run).
`kl_beta` > 0 adds Flow-GRPO's KL to the adapter-off reference (the SFT editor) over the
whole image, per sample; the paper summary names no KL term, so this is ours.
`kl_region_weights` (ours too) confines the KL to regions: per token, aggregated region by
region as the loss is; {others: 1, background: 1} holds the other objects and the
background to the SFT editor and leaves the edit region free. The shipped
`configs/spatialflow.yaml` weighs the loss on {edit: 1} and this KL on {others: 1,
background: 1}: measured on ShapeWorld (docs/benchmarks.md, session 5, under the earlier
blended rule), the background's and other objects' own advantages neither held the scene
nor let the edit learn as fast, and the KL did hold it.
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
from lit_grpo.objectives.scene_hold import HoldDraws, hold_state, velocity_hold
from lit_grpo.sampling.flow import host_to_device
from lit_grpo.sampling.sde import SDEStep


def region_weighted_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    region_adv: Tensor,
    cover: Tensor,
    region_weights: Tensor,
    clip_range: float,
    row_weights: Tensor | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """SpatialFlow-GRPO's region-weighted aggregation of the per-token clipped loss, each
    region on its own advantage (the apportioning rule of the module docstring).

    log_prob, old_log_prob: [N, T] per token; region_adv: [N, R]; cover: [N, R, T] region
    fractions; region_weights: [R]. Per region r and token: max(-A_r * ratio,
    -A_r * clamp(ratio, 1 - e, 1 + e)); per region: the cover-weighted mean over its tokens;
    per row: the `region_weights`-weighted mean over the regions present in it (so a small
    edit region counts as much as a large background, by weight, not by size: our reading
    of "region-weighted aggregation"); then the `row_weights`-weighted sum over rows divided
    by `denominator` (as `clipped_policy_loss`). The advantages of a region of weight 0 are
    not read: any values there (inf, nan included) give the same loss and gradient, bit for
    bit.
    """
    if region_adv.shape != cover.shape[:2]:
        raise ValueError(
            f"region advantages {tuple(region_adv.shape)} do not match cover {tuple(cover.shape)}"
        )
    if not log_prob.shape == old_log_prob.shape == (cover.shape[0], cover.shape[2]):
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)} and old_log_prob {tuple(old_log_prob.shape)} "
            f"must be [N, T] = {(cover.shape[0], cover.shape[2])}, as cover {tuple(cover.shape)}"
        )
    w = region_weights.to(region_adv)
    # a weightless region's advantage is replaced, not multiplied by 0 (0 * inf is nan)
    adv = torch.where(w[None] != 0, region_adv, torch.zeros_like(region_adv))  # [N, R]
    # [N, R, T]: region r's term on each token; ratio [N, 1, T]
    per_token, ratio = clipped_surrogate(
        log_prob[:, None], old_log_prob[:, None], adv[:, :, None], clip_range
    )
    with torch.no_grad():
        stats = PolicyLossStats(
            ratio_mean=ratio.mean(),
            clip_fraction=((ratio - 1).abs() > clip_range).float().mean(),
            approx_kl=(0.5 * (log_prob - old_log_prob) ** 2).mean(),
        )
    per_row = _region_mean(per_token, cover, w)  # [N]
    rw = torch.ones_like(per_row) if row_weights is None else row_weights.to(per_row)
    norm = rw.sum() if denominator is None else torch.as_tensor(denominator).to(per_row)
    return (per_row * rw).sum() / norm.clamp_min(1e-8), stats


def token_credit(region_adv: Tensor, cover: Tensor, region_weights: Tensor) -> Tensor:
    """The push on each token's log-probability at ratio 1 [N, T]: minus the gradient of a
    row's `region_weighted_loss` (before row weights and denominator), i.e. sum over regions
    of w_r / W * cover_r / size_r * A_r, W the weight of the regions present in the row and
    size_r the region's total cover (region_adv [N, R], cover [N, R, T], region_weights
    [R]). Whole-image Flow-GRPO on token-averaged log-probs pushes each token by A / T."""
    w = region_weights.to(region_adv)
    adv = torch.where(w[None] != 0, region_adv, torch.zeros_like(region_adv))  # [N, R]
    size = cover.sum(-1)  # [N, R]
    present = w[None] * (size > 0)
    share = present / present.sum(-1, keepdim=True).clamp_min(1e-8)  # [N, R]
    return (share[:, :, None] * cover / size[:, :, None].clamp_min(1e-8) * adv[:, :, None]).sum(1)


def region_mean(per_token: Tensor, cover: Tensor, region_weights: Tensor) -> Tensor:
    """Per row [N]: the `region_weights`-weighted mean, over the regions present in the row,
    of each region's cover-weighted mean over its tokens (cover [N, R, T], region_weights
    [R]). per_token: [N, T], a term the same in every region (the region KL, the scene hold),
    or [N, R, T], each region's own term on each token (`region_nft.py`)."""
    terms = per_token[:, None] if per_token.ndim == 2 else per_token
    n, r, t = cover.shape
    if (
        terms.ndim != 3
        or terms.shape[0] != n
        or terms.shape[2] != t
        or terms.shape[1] not in (1, r)
    ):
        raise ValueError(
            f"cover {tuple(cover.shape)} does not match tokens {tuple(per_token.shape)}"
        )
    return _region_mean(terms, cover, region_weights)


def _region_mean(per_token: Tensor, cover: Tensor, region_weights: Tensor) -> Tensor:
    """`region_mean` of terms per region and token (per_token [N, R or 1, T])."""
    size = cover.sum(-1)  # [N, R]
    per_region = (cover * per_token).sum(-1) / size.clamp_min(1e-8)
    w = region_weights.to(per_region)[None] * (size > 0)  # [N, R]
    return (w * per_region).sum(-1) / w.sum(-1).clamp_min(1e-8)


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
        hold_beta: > 0 adds the scene hold (ours, `lit_grpo.objectives.scene_hold`): the
            squared velocity difference to the reference on forward-process states of the
            rollouts' own edits, at a level drawn from the whole sampling schedule per loss
            term, averaged over the regions of `hold_region_weights`.
        hold_region_weights: the regions the hold holds, by name (default: the KL's
            `kl_region_weights`; one of the two must be set with `hold_beta` > 0).
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
        hold_beta: float = 0.0,
        hold_region_weights: dict[str, float] | None = None,
    ):
        super().__init__(clip_range, kl_beta, adv_std, adv_clamp)
        for name, weights in (
            ("region_weights", region_weights),
            ("kl_region_weights", kl_region_weights),
            ("hold_region_weights", hold_region_weights),
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
        if hold_beta < 0:
            raise ValueError(f"hold_beta must be >= 0, got {hold_beta}")
        hold_region_weights = hold_region_weights or kl_region_weights
        if hold_beta > 0 and hold_region_weights is None:
            raise ValueError(
                "hold_beta > 0 needs the regions to hold: set hold_region_weights (or "
                "kl_region_weights), e.g. {others: 1.0, background: 1.0}"
            )
        self.region_reward = region_reward
        self.region_weights, self.kl_region_weights = region_weights, kl_region_weights
        self.hold_beta, self.hold_region_weights = hold_beta, hold_region_weights
        self._hold = HoldDraws()

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
        """(the loss's weights, the KL's weights or None) in the order of `names` (the
        hold's names are checked too)."""
        if self.hold_region_weights is not None:
            weights_by_name(self.hold_region_weights, names, "hold_region_weights")
        return weights_by_name(self.region_weights, names, "region_weights"), (
            None
            if self.kl_region_weights is None
            else weights_by_name(self.kl_region_weights, names, "kl_region_weights")
        )

    def advantages(
        self, scores, group_size: int, ranks: Ranks, policy
    ) -> tuple[Advantages, PolicyTargets]:
        """Per-region group advantages [N, R] and the regions' cover of the tokens [N, R, T]."""
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
        region_adv = torch.where(valid[:, None], region_adv, 0.0)
        # the rows that train: every rank's, for the loss denominator and the skip decision
        adv = Advantages(total.values, zero_spread, ranks.gather(valid).reshape(-1))
        return adv, PolicyTargets(total_values, valid, regions=region_adv, cover=cover)

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

    @property
    def region_names(self) -> tuple[str, ...]:
        """The region reward's region names, in its order (known once `advantages` ran)."""
        return self._names

    def _region_weights(self, kl: bool, device) -> Tensor:
        loss, kl_weights = self.weights(self._names)
        w = kl_weights if kl else loss
        return host_to_device(torch.tensor(w, dtype=torch.float32), device)  # no sync

    def epoch_rows(self, record, minibatches: int, device, generator=None) -> Tensor:
        """The base's rows; first, with the hold on, its levels and noise for a record not
        seen before (the update's CPU `generator`: a resumed run draws the same)."""
        if self.hold_beta > 0:
            self._hold.prepare(record, self.terms(record), generator)
        return super().epoch_rows(record, minibatches, device, generator)

    def loss(self, inputs: LossInputs) -> tuple[Tensor, LossStats]:
        """Flow-GRPO's loss with the region terms (+ hold_beta x the scene hold)."""
        loss, stats = super().loss(inputs)
        if self.hold_beta > 0:
            hold = inputs.per_row_sum(self.row_hold(inputs))
            loss = loss + self.hold_beta * hold
            stats.loss, stats.hold = loss.detach(), hold.detach()
        return loss, stats

    def row_hold(self, inputs: LossInputs) -> Tensor:
        """The scene hold of each row [n] at term k's drawn level (scene_hold.py)."""
        record, rows, policy = inputs.record, inputs.rows, inputs.policy
        self._hold.prepare(record, self.terms(record))  # a no-op after epoch_rows
        x_s, sigma = hold_state(
            record.latents[rows],
            self._hold.noise[rows, inputs.k],
            self._hold.level(inputs.k, inputs.sampler.steps),
            inputs.sampler.steps,
            inputs.sampler.shift,
        )
        x_s, cond = x_s.to(policy.latent_dtype), record.condition[rows]
        v = policy.velocity(x_s, sigma, cond)  # with grad
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x_s, sigma, cond)
        per_token = velocity_hold(
            v, v_ref, lambda e: policy.latent_to_tokens(e, tuple(record.images.shape[-2:]))
        )
        names = self._names
        weights = weights_by_name(self.hold_region_weights, names, "hold_region_weights")
        weights = host_to_device(torch.tensor(weights, dtype=torch.float32), per_token.device)
        return region_mean(per_token, inputs.targets.cover[rows], weights)

    def policy_loss(self, inputs: LossInputs, step: SDEStep) -> tuple[Tensor, LossStats]:
        """The per-token clipped loss, region by region on each region's advantage."""
        rows, record, targets = inputs.rows, inputs.record, inputs.targets
        size = tuple(record.images.shape[-2:])
        new = inputs.policy.latent_to_tokens(step.log_prob, size)  # [n, T]
        old = inputs.policy.latent_to_tokens(record.log_prob_elements[rows, inputs.k], size)
        loss, s = region_weighted_loss(
            new,
            old,
            targets.regions[rows],
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


def weights_by_name(
    weights: dict[str, float] | None, names: tuple[str, ...], what: str
) -> list[float]:
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
