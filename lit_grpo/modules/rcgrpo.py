"""RC-GRPO-Editing (region-constrained GRPO for flow-based editing): its edit region and
its two presets.

Per condition, the edit region comes from what a reward could see: the object segmented
once in the source and the instruction (`perception.geometry.edit_region`: the mask
shifted by the instructed move, its box grown by the factor, its bounding disk for a
rotation, plus a margin). `EditRegions` then hands it

1. to the noise builder at latent resolution (`policy.latent_masks`): a group shares its
   initial noise outside the region and explores inside it (`RegionDecoupledNoise`);
2. to the rewards at token resolution (`policy.pixel_to_tokens`) beside the sampler's
   instruction-to-image attention maps, for `AttentionConcentrationReward`.

The paper samples with the deterministic ODE and takes its objective from Neighbor GRPO:
`NeighborRCGRPOModule` (`configs/rcgrpo.yaml`; `lit_grpo.objectives.neighbor`). Beside it,
our extension (`RCGRPOModule`, `configs/rcgrpo_sde.yaml`): Flow-GRPO's SDE with its step
noise decoupled the same way (`RegionDecoupledNoise(mask_sde=True)`) and log-probabilities
averaged over the region (`lit_grpo.objectives.rcgrpo`). Where the paper leaves it open,
ours: the region's construction, its margin, and that the region is a coverage in [0, 1]
(cells on its edge count in part).

The presets are `GRPOModule` with these components filled in; the same run is
`GRPOModule(objective=..., regions=EditRegions(...), noise=..., strategy=...)`.
"""

from torch import Tensor

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.regions import Regions
from lit_grpo.objectives.neighbor import NeighborGRPO
from lit_grpo.objectives.rcgrpo import RegionAveragedGRPO
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.detections import Detections
from lit_grpo.policies.base import EditPolicy
from lit_grpo.rewards.base import EditSpec, Reward
from lit_grpo.sampling.noise import RegionDecoupledNoise
from lit_grpo.sampling.strategies import ODETrajectory


class EditRegions(Regions):
    """RC-GRPO's edit region, to the noise builder and the rewards (see module docstring).

    Args:
        move_fraction: the instructed translation as a fraction of the image side (the
            data's; ShapeWorld's 0.25), to place the region of a move.
        region_margin: pixels the edit region is grown by.
    """

    def __init__(self, move_fraction: float = 0.25, region_margin: int = 1):
        super().__init__()
        self.move_fraction, self.region_margin = move_fraction, region_margin

    def region(self, before: Detections, batch: dict) -> Tensor:
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

    def noise_regions(self, policy, segmenter, batch: dict, group_size: int) -> Tensor:
        _, region = self(segmenter, batch)
        return policy.latent_masks(region).repeat_interleave(group_size, 0)  # [B * G, h, w]


class RCGRPOModule(GRPOModule):
    """RC-GRPO with Flow-GRPO's SDE, our extension (see module docstring): `GRPOModule` with
    `objective=RegionAveragedGRPO(clip_range, kl_beta, adv_std, adv_clamp)`,
    `regions=EditRegions(move_fraction, region_margin)` and `noise` defaulting to
    `RegionDecoupledNoise(mask_sde=True)`. Takes every other `GRPOModule` argument."""

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        move_fraction: float = 0.25,
        region_margin: int = 1,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_std: str = "global",
        adv_clamp: float = 5.0,
        **kwargs,
    ):
        kwargs["noise"] = kwargs.get("noise") or RegionDecoupledNoise(mask_sde=True)
        objective = RegionAveragedGRPO(clip_range, kl_beta, adv_std, adv_clamp)
        regions = EditRegions(move_fraction, region_margin)
        super().__init__(policy, rewards, objective=objective, regions=regions, **kwargs)


class NeighborRCGRPOModule(GRPOModule):
    """RC-GRPO-Editing, the paper's path (see module docstring): `GRPOModule` with ODE
    rollouts (`strategy` defaults to `ODETrajectory()`), region-decoupled perturbed initial
    noise (`noise` defaults to `RegionDecoupledNoise(perturbation)`), `EditRegions` and
    `NeighborGRPO(clip_range, anchors, temperature, quasi_norm_p, adv_clamp)`.
    `noise_level` does not apply; there is no KL term (`kl_beta` must stay 0).

    Args:
        perturbation: sigma of eq. 7 inside the edit region (the paper: 0.3 on whole images).
        anchors, temperature, quasi_norm_p, clip_range, adv_clamp: `NeighborGRPO`'s.
        move_fraction, region_margin: `EditRegions`'.
    """

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        perturbation: float = 0.3,
        anchors: int | None = None,
        temperature: float = 1e-3,
        quasi_norm_p: float = 0.8,
        move_fraction: float = 0.25,
        region_margin: int = 1,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_clamp: float = 5.0,
        **kwargs,
    ):
        if kl_beta > 0:
            raise ValueError("NeighborRCGRPOModule has no KL term: set kl_beta to 0")
        kwargs["strategy"] = kwargs.get("strategy") or ODETrajectory()
        kwargs["noise"] = kwargs.get("noise") or RegionDecoupledNoise(perturbation=perturbation)
        objective = NeighborGRPO(clip_range, anchors, temperature, quasi_norm_p, adv_clamp)
        regions = EditRegions(move_fraction, region_margin)
        super().__init__(policy, rewards, objective=objective, regions=regions, **kwargs)
