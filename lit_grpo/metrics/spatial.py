"""Edit metrics, on the measurements the spatial rewards use (`lit_grpo.perception.geometry`).

Talk2Move names the metrics Trans. Dist., Acc., Rot. Err. and L1 but does not give the
thresholds below; they and the units are our choices. Each is the mean over the edits of its task (see
`base.EditMetric` for the update contract and DDP), with a missed object (not found in the
source or the edit) a failure:

- TranslationDistance: centre displacement along the instructed direction, in image sides
  (our units for Talk2Move's Trans. Dist.); a miss scores 0.
- TranslationAccuracy: `geometry.translation_success`, our rule: moved the instructed way by
  more than `min_move` (5 %) of the side, and more along the instructed direction than
  across it.
- GenEvalTranslationAccuracy: `geometry.geneval_relation`, GenEval's relative-position rule
  (djghosh13/geneval, evaluation/evaluate_images.py, `relative_position`) between the
  object's box after and before the edit, for comparison with other work.
- RotationError: |achieved - instructed rotation| as a fraction of 180 deg (our scale for
  Talk2Move's Rot. Err.; `degrees=True` for degrees); a miss scores the maximum, 180 deg.
- RotationAccuracy: rotation error <= `max_degrees` (20, our threshold).
- ScaleAccuracy: |log(achieved size ratio / instructed factor)| <= `max_log_error` (0.15, our
  threshold: the ratio within about 15 % of the factor, symmetric for growing and shrinking).
- BackgroundL1: mean |edit - source| outside the object's ground-truth regions before and
  after the edit (batch["mask_before"], batch["mask_after"], grown by `dilate` px). Unlike
  `BackgroundReward`, which must use the segmenter's masks, the metric uses the true regions,
  so an edit that puts the object in the wrong place also pays for the pixels it changed.
  Real images have no true region after the edit: without both masks in the batch the
  segmenter's are used (`object_regions`), as the reward does.
- ObjectFound: fraction of edits in which the segmenter found the object in the edit.
- EditCount: the number of edits (a sum, not a mean), for the table's n column.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lit_grpo.metrics.base import EditMetric
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.detections import Detections


def _size(images: Tensor) -> tuple[int, int]:
    return tuple(images.shape[-2:])


class TranslationDistance(EditMetric):
    """Mean signed displacement along the instructed direction, in image sides."""

    task = "translate"
    higher_is_better = True

    def values(self, source, edited, batch, before, after) -> Tensor:
        return geo.translation_distance(before, after, batch["direction"], _size(edited))


class TranslationAccuracy(EditMetric):
    """Fraction of translations that moved the instructed way, by our rule (module docstring)."""

    task = "translate"
    higher_is_better = True

    def __init__(self, min_move: float = 0.05) -> None:
        super().__init__()
        self.min_move = min_move

    def values(self, source, edited, batch, before, after) -> Tensor:
        d = batch["direction"]
        return geo.translation_success(before, after, d, _size(edited), self.min_move)


class GenEvalTranslationAccuracy(EditMetric):
    """Fraction of translations after which the object's box is in GenEval's relation to its
    source box in the instructed direction ("moved left": "left of" its old box).

    GenEval's `relative_position` rule, as `geometry.geneval_relation` documents it: box
    centres, a per-axis margin of `position_threshold` x the two boxes' sizes, the shrunk
    offset over the offset's norm above 0.5 along the axis. Unlike `TranslationAccuracy`
    (ours: more than 5 % of the side, within 45 deg), it has no minimum move in image sides
    but asks a move of more than 0.4 of the object's size, and it accepts up to 60 deg off
    the axis. Directions must be the four axes.
    """

    task = "translate"
    higher_is_better = True

    def __init__(self, position_threshold: float = geo.GENEVAL_POSITION_THRESHOLD) -> None:
        super().__init__()
        self.position_threshold = position_threshold

    def values(self, source, edited, batch, before, after) -> Tensor:
        return geo.geneval_relation(before, after, batch["direction"], self.position_threshold)


class RotationError(EditMetric):
    """Mean |achieved - instructed| rotation, as a fraction of 180 deg unless `degrees`."""

    task = "rotate"
    higher_is_better = False

    def __init__(self, degrees: bool = False) -> None:
        super().__init__()
        self.degrees = degrees
        self.miss = 180.0 if degrees else 1.0

    def values(self, source, edited, batch, before, after) -> Tensor:
        err = geo.rotation_error(before, after, batch["angle"])
        return err if self.degrees else err / 180.0


class RotationAccuracy(EditMetric):
    """Fraction of rotations within `max_degrees` (our threshold) of the instructed angle."""

    task = "rotate"
    higher_is_better = True

    def __init__(self, max_degrees: float = 20.0) -> None:
        super().__init__()
        self.max_degrees = max_degrees

    def values(self, source, edited, batch, before, after) -> Tensor:
        err = geo.rotation_error(before, after, batch["angle"])
        return torch.where(err.isnan(), err, (err <= self.max_degrees).float())


class ScaleAccuracy(EditMetric):
    """Fraction of scalings whose size ratio is within `max_log_error` (log; our threshold) of
    the factor."""

    task = "scale"
    higher_is_better = True

    def __init__(self, max_log_error: float = 0.15) -> None:
        super().__init__()
        self.max_log_error = max_log_error

    def values(self, source, edited, batch, before, after) -> Tensor:
        err = geo.scale_error(before, after, batch["factor"])
        return torch.where(err.isnan(), err, (err <= self.max_log_error).float())


def object_regions(batch: Mapping, before: Detections, after: Detections) -> list[Tensor]:
    """The object's regions [N, H, W] before and after the edit: the batch's true masks where
    it has both (ShapeWorld), else the segmenter's (real images; nothing where it missed)."""
    if "mask_before" in batch and "mask_after" in batch:
        return [batch["mask_before"], batch["mask_after"]]
    return [before.mask, after.mask & after.found[:, None, None]]


class BackgroundL1(EditMetric):
    """Mean |edit - source| outside the object's true regions before and after the edit."""

    higher_is_better = False

    def __init__(self, task: str | None = None, dilate: int = 1) -> None:
        super().__init__(task)
        self.dilate = dilate

    def values(self, source, edited, batch: Mapping, before, after) -> Tensor:
        keep = geo.outside_mask(object_regions(batch, before, after), self.dilate)
        return geo.background_l1(source, edited, keep)


class ObjectFound(EditMetric):
    """Fraction of edits in which the segmenter found the object."""

    higher_is_better = True

    def values(self, source, edited, batch, before, after: Detections) -> Tensor:
        return after.found.float()


class EditCount(EditMetric):
    """Number of edits seen (summed across ranks)."""

    def values(self, source, edited, batch, before, after) -> Tensor:
        return torch.ones(edited.shape[0], device=edited.device)

    def compute(self) -> Tensor:
        return self.count
