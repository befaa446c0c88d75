"""SpatialFlow-GRPO's preset: `GRPOModule` with `lit_grpo.objectives.SpatialFlowGRPO` (the
region-level advantages and the region-weighted loss; the paper's maths and our choices
are in that file's docstring) and a region reward (`lit_grpo.rewards.RegionReward`).

The same run is `GRPOModule(objective=SpatialFlowGRPO(...))`; the preset keeps the objective's
settings at the top of `model.init_args`, as `configs/spatialflow.yaml` writes them.
"""

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.objectives.spatialflow import SpatialFlowGRPO
from lit_grpo.policies.base import EditPolicy
from lit_grpo.rewards.base import Reward


class SpatialFlowGRPOModule(GRPOModule):
    """`GRPOModule` with `objective=SpatialFlowGRPO(clip_range, kl_beta, adv_std, adv_clamp,
    region_reward, region_weights, kl_region_weights, hold_beta, hold_region_weights)` (see
    `SpatialFlowGRPO` for each); takes every other `GRPOModule` argument. Region weights go by name, e.g.
    `region_weights: {edit: 1.0, others: 0.0, background: 0.0}`."""

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        region_reward: str | None = None,
        region_weights: dict[str, float] | None = None,
        kl_region_weights: dict[str, float] | None = None,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_std: str = "global",
        adv_clamp: float = 5.0,
        hold_beta: float = 0.0,
        hold_region_weights: dict[str, float] | None = None,
        **kwargs,
    ):
        objective = SpatialFlowGRPO(
            clip_range,
            kl_beta,
            adv_std,
            adv_clamp,
            region_reward,
            region_weights,
            kl_region_weights,
            hold_beta,
            hold_region_weights,
        )
        super().__init__(policy, rewards, objective=objective, **kwargs)
