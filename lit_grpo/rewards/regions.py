"""SpatialFlow-GRPO's region-level reward: one score per semantic region of an edit.

SpatialFlow-GRPO (papers/002) scores regions with a trained reward model (SFReward). On
ShapeWorld the regions and their scores can be computed directly from the segmenter's masks,
which is what this reward does (our substitution for SFReward):

| region     | pixels                                                     | score                          |
| ---------- | ---------------------------------------------------------- | ------------------------------ |
| edit       | the object in the source and in the edit (grown by dilate) | the task's spatial rewards     |
| others     | every other object of the source (grown), outside `edit`   | -L1 between source and edit    |
| background | everything else                                            | -L1 between source and edit    |

The regions partition the image (`region_masks` [N, 3, H, W], 0/1). `scores` [N] is their
sum, for logging and for the rollouts' validity; the region-level stage
(`lit_grpo.modules.SpatialFlowGRPOModule`) trains on the region scores.
"""

import torch
from torch import Tensor, nn

from lit_grpo.perception import geometry as geo
from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput

REGIONS = ("edit", "others", "background")


class RegionReward(Reward):
    """Scores per region (see module docstring).

    Args:
        edit: the rewards that score the edit region (the spatial rewards of the tasks;
            each scores its own task's rows); their weights apply.
        weight: this reward's share of the total.
        dilate: pixels by which object masks grow (anti-aliased edges belong to the object).
    """

    name = "regions"
    needs_scene = True

    def __init__(self, edit: list[Reward], weight: float = 1.0, dilate: int = 1):
        super().__init__(weight)
        if not edit:
            raise ValueError(
                "RegionReward needs the edit region's rewards (e.g. TranslationReward)"
            )
        self.edit = nn.ModuleList(edit)
        self.dilate = dilate

    def region_masks(self, inputs: RewardInputs) -> Tensor:
        """[N, 3, H, W] float 0/1: edit, others, background (a partition of the image)."""
        after = inputs.after.mask & inputs.after.found[:, None, None]
        edit = ~geo.outside_mask([inputs.before.mask, after], self.dilate)
        if inputs.source_objects is None:
            raise ValueError("RegionReward needs RewardInputs.source_objects (a SceneSegmenter)")
        others = ~geo.outside_mask([inputs.source_objects], self.dilate) & ~edit
        background = ~(edit | others)
        return torch.stack([edit, others, background], 1).float()

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        masks = self.region_masks(inputs)
        edit = sum(r.weight * r(inputs).scores.float() for r in self.edit)
        l1 = [geo.background_l1(inputs.source, inputs.images, masks[:, k] > 0) for k in (1, 2)]
        # a region with no pixels scores 0 (it then has no tokens either)
        present = masks.flatten(2).sum(-1) > 0  # [N, 3]
        scores = torch.stack([edit, -l1[0], -l1[1]], 1)
        scores = torch.where(present | torch.isnan(scores), scores, torch.zeros_like(scores))
        return RewardOutput(
            scores.sum(1),
            {"region_edit": edit, "others_l1": l1[0], "background_l1": l1[1]},
            regions=scores,
            region_names=REGIONS,
            region_masks=masks,
        )
