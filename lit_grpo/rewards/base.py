"""The one reward contract.

Every reward is a callable `reward(inputs) -> RewardOutput` over a `RewardInputs` built once
per rollout batch (`lit_grpo.rewards.scoring.Scorer.observe`). A reward sees what a reward
on real images could see: the decoded edits in the agreed format (float [N, 3, H, W] in
[0, 1]), their source images, the instructions and their parsed `EditSpec` (task, object,
direction / angle / factor), and the segmenter's detections of the named object in the
source and in the edit (segmented once, shared by every reward). It never sees the
ground-truth target, masks or boxes: those stay with the evaluation metrics.

A reward returns scores [N] (NaN marks a sample it cannot score; the GRPO stage drops
those), optional named sub-scores for logging, and, for region methods, optional scores
per region [N, R] with the regions' names. Rewards are frozen judges: no gradients, no state.

Rewards are run through `run_reward` (by the `Scorer`, and by rewards that hold rewards, such
as `RegionReward`): a reward that raises, or returns anything but a `RewardOutput` with [N]
scores and [N] sub-scores, stops the run with one `RewardFailed` line naming the reward (its
class and `name`, the reward it sits in) and what was wrong.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_grpo.checks import RunFailed
from lit_grpo.perception.detections import Detections


@dataclass
class EditSpec:
    """What an instruction asks for, one row per edit.

    task: "translate" | "rotate" | "scale" per row; object: the phrase naming the object;
    direction: [N, 2] unit (dx, dy) in image axes (y down), 0 for other tasks;
    angle: [N] signed degrees, + = counter-clockwise as seen; factor: [N] linear size factor.
    """

    task: list[str]
    object: list[str]
    direction: Tensor
    angle: Tensor
    factor: Tensor

    FIELDS = ("task", "object", "direction", "angle", "factor")

    @classmethod
    def from_batch(cls, batch: dict) -> "EditSpec":
        """The spec fields of a data batch (ShapeWorld's, or any datamodule that parses its
        instructions into them); every other key of the batch is left behind."""
        missing = [k for k in cls.FIELDS if k not in batch]
        if missing:
            raise KeyError(f"the batch has no edit-spec field(s) {missing}; rewards need them")
        return cls(
            task=list(batch["task"]),
            object=list(batch["object"]),
            direction=torch.as_tensor(batch["direction"]).float(),
            angle=torch.as_tensor(batch["angle"]).float(),
            factor=torch.as_tensor(batch["factor"]).float(),
        )

    def repeat_interleave(self, repeats: int) -> "EditSpec":
        """Each row `repeats` times in a row (the layout of a rollout group)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value.repeat_interleave(repeats, 0)
            else:
                out[f.name] = [v for v in value for _ in range(repeats)]
        return replace(self, **out)


@dataclass
class RewardInputs:
    """images, source: [N, 3, H, W] in [0, 1]; instructions: N strings; spec: their parsed
    `EditSpec`; before / after: detections of the object in source and edit; ids: [N]
    sample identifiers of the rows (for logging; not ground truth), or None;
    source_objects: [N, H, W] bool, every object the segmenter sees in the source (filled
    when a reward sets `needs_scene` and the segmenter is a `SceneSegmenter`), or None.

    For attention rewards, when the stage records them (None otherwise):
    attention: [N, L, rows, cols] the instruction tokens' attention over the edit's image
        tokens, averaged over the sampled steps (padding tokens 0);
    attention_region: [N, rows, cols] the share of each image token that the stage's region
        covers (the policy's `pixel_to_tokens`): RC-GRPO's edit region
        (`perception.geometry.edit_region`), InstructRL4Pix's target region
        (`perception.geometry.target_region`);
    attention_tokens: [N, L] 1.0 on the instruction tokens that name the edited object
        (the policy's `phrase_tokens` of `spec.object`), 0 elsewhere."""

    images: Tensor
    source: Tensor
    instructions: Sequence[str]
    spec: EditSpec
    before: Detections
    after: Detections
    ids: Tensor | None = None
    source_objects: Tensor | None = None
    attention: Tensor | None = None
    attention_region: Tensor | None = None
    attention_tokens: Tensor | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def task_is(self, task: str) -> Tensor:
        mask = torch.tensor([t == task for t in self.spec.task])
        # non-blocking: a blocking copy to a GPU would wait for its queue to drain
        return mask.to(self.images.device, non_blocking=True)


@dataclass
class RewardOutput:
    """scores [N]; extras: named [N] sub-scores for logging; regions: optional [N, R] scores
    per region, named by `region_names`, over the pixel regions `region_masks` [N, R, H, W]
    (fractions that sum to 1 at every pixel; region-level methods)."""

    scores: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    regions: Tensor | None = None
    region_names: tuple[str, ...] = ()
    region_masks: Tensor | None = None


class Reward(nn.Module):
    """Base class: `name` keys its logs, `weight` its share of the total (set in YAML)."""

    name = "reward"
    needs_scene = False  # True: wants RewardInputs.source_objects (every object in the source)

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


class RewardFailed(RunFailed):
    """A reward raised, or returned what the reward contract does not allow; the message
    names the reward and what was wrong, in one line."""


def run_reward(reward: Reward, inputs: RewardInputs, within: Reward | None = None) -> RewardOutput:
    """`reward(inputs)`, checked against the contract: an exception inside the reward, an
    output that is not a `RewardOutput`, scores or sub-scores that are not [N] tensors,
    become one `RewardFailed` naming the reward (and `within`, the reward that holds it)."""
    n = inputs.images.shape[0]
    label = f"reward {type(reward).__name__} {reward.name!r}"
    if within is not None:
        label += f" (in {type(within).__name__} {within.name!r})"
    try:
        out = reward(inputs)
    except RewardFailed:  # a reward inside this one: already named
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise RewardFailed(
            f"{label} raised {type(err).__name__}: {first} ({_raised_at(err)}); fix the "
            "reward, or leave it out of model.init_args.rewards"
        ) from err
    if not isinstance(out, RewardOutput):
        raise RewardFailed(
            f"{label} returned a {type(out).__name__}; the contract is a RewardOutput with "
            f"scores [N] = ({n},)"
        )
    parts = {"scores": out.scores, **{f"extras[{k!r}]": v for k, v in out.extras.items()}}
    for key, value in parts.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise RewardFailed(
                f"{label} returned {key} of shape {got}; the contract is [N] = ({n},), one "
                "score per edit"
            )
    return out


def _raised_at(err: BaseException) -> str:
    """file:line, in function, of the innermost frame of `err`'s traceback."""
    tb = err.__traceback__
    if tb is None:
        return "no traceback"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"at {Path(code.co_filename).name}:{tb.tb_lineno}, in {code.co_name}"
