"""SpatialFlow-GRPO's region-level reward: one score per semantic region of an edit.

SpatialFlow-GRPO (papers/002) scores regions with a trained reward model (SFReward). On
ShapeWorld the regions and their scores can be computed directly from the segmenter's masks,
which is what this reward does (our substitution for SFReward):

| region     | pixels                                                     | score                          |
| ---------- | ---------------------------------------------------------- | ------------------------------ |
| edit       | the object in the source, in the edit and where the        | the task's spatial rewards     |
|            | instruction puts it (each grown by dilate)                 |                                |
| others     | every other object of the source (grown), outside `edit`   | -L1 between source and edit    |
| background | everything else                                            | -L1 between source and edit    |

The edit region holds the object's old place, the place the rollout drew it, and the place
the instruction asks for (`perception.geometry.target_region`: the source mask moved, turned
or scaled by the parsed instruction; `target=True`, our choice). Without the last, a rollout
that leaves the object where it was has the instructed place in its *background*: the tokens
where the object should have appeared get the background's advantage, which such a rollout
earns (it changed nothing), instead of the edit's, which it fails. With it, those tokens
carry the edit's credit in every rollout of the group (measured in docs/benchmarks.md).

The regions partition the image (`region_masks` [N, 3, H, W], 0/1). `scores` [N] is their
sum, for logging and for the rollouts' validity; the region-level stage
(`lit_grpo.modules.SpatialFlowGRPOModule`) trains on the region scores.
"""

import torch
from torch import Tensor, nn

from lit_grpo.perception import geometry as geo
from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput, run_reward

REGIONS = ("edit", "others", "background")


class RegionReward(Reward):
    """Scores per region (see module docstring).

    Args:
        edit: the rewards that score the edit region (the spatial rewards of the tasks;
            each scores its own task's rows); their weights apply.
        weight: this reward's share of the total.
        dilate: pixels by which object masks grow (anti-aliased edges belong to the object).
        target: put the instructed target place in the edit region (see module docstring);
            False gives the regions of the object's old and drawn places only.
        move_fraction: the instructed shift as a fraction of the image side, for the target
            place; None takes the `move_fraction` of the first `edit` reward that has one
            (the translation reward's), else 0.25.
    """

    name = "regions"
    needs_scene = True
    region_names = REGIONS  # the names objectives weigh the regions by

    def __init__(
        self,
        edit: list[Reward],
        weight: float = 1.0,
        dilate: int = 1,
        target: bool = True,
        move_fraction: float | None = None,
    ):
        super().__init__(weight)
        if not edit:
            raise ValueError(
                "RegionReward needs the edit region's rewards (e.g. TranslationReward)"
            )
        self.edit = nn.ModuleList(edit)
        self.dilate = dilate
        self.target = target
        if move_fraction is None:
            found = [r.move_fraction for r in edit if hasattr(r, "move_fraction")]
            move_fraction = found[0] if found else 0.25
        self.move_fraction = move_fraction

    def region_masks(self, inputs: RewardInputs) -> Tensor:
        """[N, 3, H, W] float 0/1: edit, others, background (a partition of the image)."""
        after = inputs.after.mask & inputs.after.found[:, None, None]
        places = [inputs.before.mask, after]
        if self.target:
            spec = inputs.spec
            places.append(
                geo.target_region(
                    inputs.before,
                    spec.task,
                    spec.direction,
                    spec.angle,
                    spec.factor,
                    inputs.image_size,
                    self.move_fraction,
                ).to(after.device)
            )
        edit = ~geo.outside_mask(places, self.dilate)
        if inputs.source_objects is None:
            raise ValueError("RegionReward needs RewardInputs.source_objects (a SceneSegmenter)")
        others = ~geo.outside_mask([inputs.source_objects], self.dilate) & ~edit
        background = ~(edit | others)
        return torch.stack([edit, others, background], 1).float()

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        masks = self.region_masks(inputs)
        # each edit reward checked as the Scorer checks it: a broken one is named
        edit = sum(r.weight * run_reward(r, inputs, within=self).scores.float() for r in self.edit)
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
