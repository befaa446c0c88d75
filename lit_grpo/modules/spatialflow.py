"""SpatialFlow-GRPO: region-level credit assignment on top of Flow-GRPO (papers/002).

What changes against `GRPOModule`, each in one overridden piece:
- advantages: a region reward (`lit_grpo.rewards.RegionReward`) scores every region of an
  edit ([N, R]); each region's scores are normalised within their group (gathered across
  ranks, like the whole-image ones), then mapped onto the latent tokens each region covers
  (`EditPolicy.pixel_to_tokens`): an advantage map [N, T];
- the update (`SpatialFlowUpdate.step_loss`): the clipped ratio loss per token, on
  per-token log-probabilities (the per-element log-probs of the rollout record, averaged
  over each token's elements by `EditPolicy.latent_to_tokens`), aggregated region by region
  with `region_weights` (`objectives.region_weighted_loss`).

Where we depart from the paper, on purpose: its region scores come from a trained reward
model (SFReward); ours from the segmenter's masks (exact on ShapeWorld). The paper summary
does not say what tokens outside every region get (ours: the regions partition the image)
nor how region weights are set (ours: a config list, equal by default). A row takes part in
the update when its total reward is finite and at least one region the loss weighs
(`region_weights` > 0) has spread in its group; a region with no spread in a group gets
advantage 0 there. A group with no spread in any weighed region is counted as zero-spread
(`groups/zero_spread_fraction`) and skipped, KL term included: a segmenter that finds nothing
leaves the edit region empty and its score flat, and such a batch shows as skipped, not as a
step with a loss of exactly 0 (and enough of them in a row stop the run, as in `GRPOModule`). `kl_beta` > 0 adds
Flow-GRPO's KL to the adapter-off reference (the SFT editor) over the whole image, per
sample as in `GRPOModule`; the paper summary names no KL term, so this is ours.
`kl_region_weights` (ours too) confines the KL to regions: per token, aggregated region by
region as the loss is; [0, 1, 1] holds the other objects and the background to the SFT editor
and leaves the edit region free. The shipped `configs/spatialflow.yaml` sets region_weights
[1, 0, 0] and this KL on [0, 1, 1]: measured on ShapeWorld (docs/benchmarks.md, session 5),
the background's and other objects' own advantages neither held the scene nor let the edit
learn as fast, and the KL did hold it.
"""

import torch

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.objectives import (
    Advantages,
    kl_elements,
    region_mean,
    region_weighted_loss,
    token_advantages,
)
from lit_grpo.modules.update import ClippedUpdate, PolicyTargets
from lit_grpo.rewards.scoring import Scores
from lit_grpo.sampling.flow import host_to_device
from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler


class SpatialFlowUpdate(ClippedUpdate):
    """`ClippedUpdate` with the per-token, region-weighted loss (see module docstring)."""

    def __init__(
        self,
        *args,
        region_weights: list[float] | None = None,
        kl_region_weights: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.region_weights = region_weights
        self.kl_region_weights = kl_region_weights

    @staticmethod
    def _weights(weights: list[float] | None, regions: int, name: str, device) -> torch.Tensor:
        weights = [1.0] * regions if weights is None else weights
        if len(weights) != regions:
            raise ValueError(f"{len(weights)} {name} for {regions} regions")
        return host_to_device(torch.tensor(weights, dtype=torch.float32), device)  # no sync

    def step_loss(self, module, sampler: RolloutSampler, record, targets, rows, k):
        step = sampler.rescore(module.policy, record, rows, k)
        size = tuple(record.images.shape[-2:])
        new = module.policy.latent_to_tokens(step.log_prob, size)  # [n, T]
        old = module.policy.latent_to_tokens(record.log_prob_elements[rows, k], size)
        cover = targets.cover[rows]  # [n, R, T]
        loss, s = region_weighted_loss(
            new,
            old,
            targets.tokens[rows],
            cover,
            self._weights(self.region_weights, cover.shape[1], "region_weights", new.device),
            self.clip_range,
            targets.valid[rows].float(),
            targets.denominator,
        )
        stats = {
            "loss": loss.detach(),
            "approx_kl": s.approx_kl,
            "clip_fraction": s.clip_fraction,
            "ratio": s.ratio_mean,
        }
        return self.add_kl(module, sampler, record, targets, rows, k, step, loss, stats)

    def row_kl(self, module, record, targets, rows, step, ref):
        """Without `kl_region_weights`, Flow-GRPO's KL over the whole image (the base's);
        with them, the per-token KL aggregated over the regions as the loss is."""
        if self.kl_region_weights is None:
            return super().row_kl(module, record, targets, rows, step, ref)
        size = tuple(record.images.shape[-2:])
        per_token = module.policy.latent_to_tokens(
            kl_elements(step.mean, ref.mean, step.diffusion), size
        )  # [n, T]
        cover = targets.cover[rows]
        weights = self._weights(
            self.kl_region_weights, cover.shape[1], "kl_region_weights", per_token.device
        )
        return region_mean(per_token, cover, weights)


class SpatialFlowGRPOModule(GRPOModule):
    """Flow-GRPO with SpatialFlow-GRPO's region-level advantages (see module docstring).

    Takes every `GRPOModule` argument, plus:
        region_reward: the name of the reward whose region scores train (default: the one
            reward that returns regions).
        region_weights: the weight of each of its regions in the aggregation (equal if None).
        kl_region_weights: with `kl_beta` > 0, the KL's weight in each region, aggregated as
            the loss is (e.g. [0, 1, 1]: others and background only); None: the KL over the
            whole image, per sample, as in Flow-GRPO.
    """

    def __init__(
        self,
        *args,
        region_reward: str | None = None,
        region_weights: list[float] | None = None,
        kl_region_weights: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if region_weights is not None and not any(w > 0 for w in region_weights):
            raise ValueError(
                f"region_weights {region_weights} gives no region a weight > 0: nothing would train"
            )
        hp = self.hparams
        self.updater = SpatialFlowUpdate(
            hp.clip_range,
            hp.kl_beta,
            hp.inner_epochs,
            hp.minibatches,
            hp.max_grad_norm,
            hp.micro_batch_size,
            region_weights=region_weights,
            kl_region_weights=kl_region_weights,
        )
        self.region_reward = region_reward

    def advantages(self, scores: Scores, record: RolloutRecord) -> tuple[Advantages, PolicyTargets]:
        out = self._regions(scores)
        total, total_values, _ = self.group_advantages(scores.total)
        weighed = self._weighed_regions(out.regions.shape[1])
        region_adv, region_valid, flat = [], [], []
        for r in range(out.regions.shape[1]):
            gathered, values, valid = self.group_advantages(out.regions[:, r])
            region_adv.append(values)
            if r in weighed:  # a region the loss gives no weight trains nothing
                region_valid.append(valid)
                flat.append(gathered.zero_spread)
        region_adv = torch.stack(region_adv, 1)  # [N, R]
        valid = torch.isfinite(scores.total) & torch.stack(region_valid, 1).any(1)
        zero_spread = torch.stack(flat, 1).all(1)  # [groups of every rank]
        cover = torch.stack(
            [
                self.policy.pixel_to_tokens(out.region_masks[:, r])
                for r in range(region_adv.shape[1])
            ],
            1,
        )  # [N, R, T]
        tokens = token_advantages(torch.where(valid[:, None], region_adv, 0.0), cover)
        # the rows that train: every rank's, for the loss denominator and the skip decision
        gathered = self.gather(valid)
        adv = Advantages(total.values, zero_spread, gathered.reshape(-1))
        return adv, PolicyTargets(total_values, valid, self.loss_denominator(adv), tokens, cover)

    def _weighed_regions(self, regions: int) -> list[int]:
        """The regions the loss weighs (`region_weights` > 0; all of them by default)."""
        weights = self.updater.region_weights or [1.0] * regions
        if len(weights) != regions:
            raise ValueError(f"{len(weights)} region_weights for {regions} regions")
        return [r for r, w in enumerate(weights) if w > 0]

    def _regions(self, scores: Scores):
        if not scores.regions:
            raise ValueError(
                "SpatialFlowGRPOModule needs a reward that scores regions "
                "(lit_grpo.rewards.RegionReward)"
            )
        name = self.region_reward or next(iter(scores.regions))
        if name not in scores.regions:
            raise ValueError(f"no region reward named {name!r}; have {sorted(scores.regions)}")
        return scores.regions[name]
