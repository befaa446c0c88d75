"""The one reward contract.

Every reward is a callable `reward(inputs) -> RewardOutput` over a `RewardInputs` built once
per rollout batch: decoded images in the agreed format (float [N, 3, H, W] in [0, 1]), the
batch's condition fields repeated per rollout, and the segmenter's detections of the named
object in the source and in the edit (segmented once, shared by every reward). A reward
returns scores [N] (NaN marks a sample it cannot score; the GRPO stage drops those) plus
optional named sub-scores for logging. Rewards are frozen judges: no gradients, no state.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lit_grpo.perception.detections import Detections


@dataclass
class RewardInputs:
    """images, source: [N, 3, H, W] in [0, 1]; batch: the condition fields, one row per rollout
    (task, object, direction [N, 2], angle [N], factor [N], ...); before / after: detections
    of the object in source and edit."""

    images: Tensor
    source: Tensor
    batch: dict
    before: Detections
    after: Detections

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def task_is(self, task: str) -> Tensor:
        return torch.tensor([t == task for t in self.batch["task"]], device=self.images.device)


@dataclass
class RewardOutput:
    scores: Tensor  # [N]
    extras: dict[str, Tensor] = field(default_factory=dict)  # named [N] sub-scores for logging


class Reward(nn.Module):
    """Base class: `name` keys its logs, `weight` its share of the total (set in YAML)."""

    name = "reward"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Reward":
        # Lightning switches every submodule to train mode at fit start; a judge stays in eval
        return super().train(False)

    def forward(self, inputs: RewardInputs) -> RewardOutput:  # pragma: no cover - interface
        raise NotImplementedError
