"""RC-GRPO-Editing (region-constrained GRPO for flow-based editing), our SDE variant.

Per condition, the edit region comes from what a reward could see: the object segmented
once in the source and the instruction (`perception.geometry.edit_region`: the mask
shifted by the instructed move, its box grown by the factor, its bounding disk for a
rotation, plus a margin). The region then

1. goes to the noise builder at latent resolution (`policy.latent_masks`): a group shares
   its initial noise outside the region and explores inside it (`RegionDecoupledNoise`);
2. goes to the rewards at token resolution (`policy.pixel_to_tokens`) beside the sampler's
   instruction-to-image attention maps, for `AttentionConcentrationReward`;
3. weights the policy objective: Flow-GRPO's clipped ratio on the log-probability averaged
   over the region's elements (`RegionClippedUpdate`).

The paper samples with the deterministic ODE and takes its objective from Neighbor GRPO:
that is `lit_grpo.modules.neighbor.NeighborRCGRPOModule`. This module is our extension
beside it (docs/ALGORITHMS.md): Flow-GRPO's SDE with its step noise decoupled the same way
(`RegionDecoupledNoise(mask_sde=True)`, the default here) and log-probabilities over the
region. Where the paper leaves it open, ours: the region's construction, its margin, and
that the region is a coverage in [0, 1] (cells on its edge count in part).
"""

from torch import Tensor

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.regions import BatchRegions
from lit_grpo.modules.update import ClippedUpdate
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.detections import Detections
from lit_grpo.policies.base import EditPolicy
from lit_grpo.rewards.base import EditSpec, Reward, RewardInputs
from lit_grpo.sampling.noise import RegionDecoupledNoise
from lit_grpo.sampling.rollout import RolloutRecord


class RegionClippedUpdate(ClippedUpdate):
    """Flow-GRPO's update with each step's log-probability averaged over the edit region's
    elements (weighted by coverage) instead of the whole latent: outside the region a
    group's transitions are (nearly) shared, so they carry no credit, only noise."""

    def reduce(self, elements: Tensor, record: RolloutRecord, rows: Tensor) -> Tensor:
        if record.regions is None:
            raise ValueError("the rollouts carry no edit regions: sample with RCGRPOModule")
        weight = record.regions[rows].float()[:, None].expand_as(elements)  # [n, C, h, w]
        total = weight.flatten(1).sum(1).clamp_min(1e-8)
        return (elements.float() * weight).flatten(1).sum(1) / total  # [n]


class RCGRPOModule(GRPOModule):
    """RC-GRPO with Flow-GRPO's SDE (see module docstring). Takes every `GRPOModule` argument
    (`noise` defaults to `RegionDecoupledNoise(mask_sde=True)`), and:

    Args:
        move_fraction: the instructed translation as a fraction of the image side (the
            data's; ShapeWorld's 0.25), to place the region of a move.
        region_margin: pixels the edit region is grown by.
    """

    capture_attention = True

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        move_fraction: float = 0.25,
        region_margin: int = 1,
        **kwargs,
    ):
        if kwargs.get("noise") is None:
            kwargs["noise"] = self.default_noise()
        super().__init__(policy, rewards, **kwargs)
        self.move_fraction, self.region_margin = move_fraction, region_margin
        h = self.hparams
        self.updater = self.build_updater(
            h.clip_range,
            h.kl_beta,
            h.inner_epochs,
            h.minibatches,
            h.max_grad_norm,
            h.micro_batch_size,
        )
        self._regions = BatchRegions(self.edit_region)

    def default_noise(self) -> RegionDecoupledNoise:
        return RegionDecoupledNoise(mask_sde=True)

    def build_updater(self, *settings) -> ClippedUpdate:
        return RegionClippedUpdate(*settings)

    # --- the region of each condition, from the source's detection and the instruction -------
    def edit_regions(self, batch: dict) -> tuple[Detections, Tensor]:
        """(the object's detections in the B sources, their edit regions [B, H, W] bool),
        segmented once per batch (`BatchRegions`)."""
        return self._regions(self.scorer.segmenter, batch)

    def edit_region(self, before: Detections, batch: dict) -> Tensor:
        spec = EditSpec.from_batch(batch)
        return geo.edit_region(
            before,
            spec.task,
            spec.direction,
            spec.factor,
            tuple(batch["source"].shape[-2:]),
            self.move_fraction,
            self.region_margin,
        )

    def sample_regions(self, batch: dict) -> Tensor:
        _, region = self.edit_regions(batch)
        latent = self.policy.latent_masks(region)  # [B, h, w] coverage
        return latent.repeat_interleave(self.hparams.group_size, 0)

    def observe(
        self, images: Tensor, batch: dict, repeats: int = 1, attention: Tensor | None = None
    ) -> RewardInputs:
        before, region = self.edit_regions(batch)
        rows, cols = self.policy.token_grid(tuple(region.shape[-2:]))
        tokens = self.policy.pixel_to_tokens(region).view(-1, rows, cols)  # [B, rows, cols]
        return self.scorer.observe(
            images,
            batch,
            repeats,
            attention=attention,
            attention_region=tokens.repeat_interleave(repeats, 0),
            before=before,
        )
