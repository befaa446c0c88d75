"""Talk2Move's object-level spatial rewards, on the shared measurements of `lit_grpo.perception.geometry`.

Each reward scores the rows of its own task and gives 0 to the others (a group shares one
condition, hence one task, so the zeros carry no advantage). An object the segmenter cannot
find in the edit scores the reward's lowest value, never an exception.
"""

import torch

from lit_grpo.perception import geometry as geo
from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput


class TranslationReward(Reward):
    """Centre displacement along the instructed direction, in units of the instructed distance,
    clipped to [-1, 1], minus `across_penalty` x the sideways drift (same units, clipped to
    [0, 1]). Range [-1 - across_penalty, 1]; a missing object scores the minimum.

    Args:
        move_fraction: the instructed distance as a fraction of the image side (ShapeWorld's).
        across_penalty: weight of the perpendicular drift.
    """

    name = "translation"

    def __init__(
        self, weight: float = 1.0, move_fraction: float = 0.25, across_penalty: float = 0.5
    ):
        super().__init__(weight)
        self.move_fraction = move_fraction
        self.across_penalty = across_penalty

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        d = geo.displacement(inputs.before, inputs.after, inputs.image_size)  # [N, 2]
        direction = inputs.spec.direction.float()
        along, across = geo.along_across(d, direction)
        along, across = along / self.move_fraction, across / self.move_fraction
        score = along.clamp(-1, 1) - self.across_penalty * across.clamp(0, 1)
        lowest = -1.0 - self.across_penalty
        score = torch.nan_to_num(score, nan=lowest)  # not found in the edit: lowest reward
        success = geo.translation_success(inputs.before, inputs.after, direction, inputs.image_size)
        mine = inputs.task_is("translate")
        return RewardOutput(
            torch.where(mine, score, torch.zeros_like(score)),
            {"translation_success": torch.nan_to_num(success, nan=0.0)},
        )


class RotationReward(Reward):
    """1 - error / 180 (error: achieved vs instructed rotation, degrees); missing object: 0."""

    name = "rotation"

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        err = geo.rotation_error(inputs.before, inputs.after, inputs.spec.angle)
        score = torch.nan_to_num(1 - err / 180.0, nan=0.0)
        return RewardOutput(
            torch.where(inputs.task_is("rotate"), score, torch.zeros_like(score)),
            {"rotation_error": err},
        )


class ScaleReward(Reward):
    """exp(-|log(achieved ratio / instructed factor)|) in (0, 1]; missing object: 0."""

    name = "scale"

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        err = geo.scale_error(inputs.before, inputs.after, inputs.spec.factor)
        score = torch.nan_to_num(torch.exp(-err), nan=0.0)
        return RewardOutput(torch.where(inputs.task_is("scale"), score, torch.zeros_like(score)))


class BackgroundReward(Reward):
    """Scene preservation: -L1 between source and edit outside the object's old and new
    regions (each grown by `dilate` px). Where the edit lost the object only the old region
    is excluded."""

    name = "background"

    def __init__(self, weight: float = 1.0, dilate: int = 1):
        super().__init__(weight)
        self.dilate = dilate

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        after = inputs.after.mask & inputs.after.found[:, None, None]
        keep = geo.outside_mask([inputs.before.mask, after], self.dilate)
        l1 = geo.background_l1(inputs.source, inputs.images, keep)
        return RewardOutput(-l1, {"background_l1": l1})
