"""CLIP score of the edit against a text of the batch, through open_clip with local weights.

Score per edit: 100 * max(cos(E_image, E_text), 0) (Hessel et al.'s CLIPScore, torchmetrics'
formula; torchmetrics clamps the batch mean, we clamp each edit as the paper does). The text is
batch["instruction"] by default (InstructRL4Pix's CLIP reward, `lit_grpo.rewards.CLIPReward`,
pairs the edit with its instruction too); ShapeWorld has no caption of the edited scene, and
a dataset that has one can name its field in `text`. CLIP reads little geometry: on spatial
edits this measures that the scene still shows what the text names, not that the object moved.

Why not torchmetrics' `CLIPScore`: since 1.7 it takes a callable returning (model, processor),
but that pair must speak transformers' interface (a processor taking lists of CPU images and
returning "pixel_values", a model with `get_image_features`, `get_text_features` and
`.config`), so open_clip needs two adapter classes; and its model sits in the metric's
`state_dict`, so a LightningModule owning it would checkpoint the CLIP weights. This class
uses open_clip directly (`lit_grpo.perception.clip`) and keeps the model outside the state
(see `perception.frozen.Frozen`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lit_grpo.metrics.base import EditMetric
from lit_grpo.perception.clip import check_clip_files, load_open_clip

__all__ = ["CLIPScore", "check_clip_files", "load_open_clip"]


class CLIPScore(EditMetric):
    """Mean CLIP score (0-100, higher is better) of the edits against `batch[text]`.

    Args:
        model: open_clip architecture name, or path of a model-config JSON.
        pretrained: local weights file (required: nothing is downloaded).
        text: the batch field holding one text per edit.
        task: score only this task's edits (None: all).
    """

    higher_is_better = True

    def __init__(
        self,
        model: str,
        pretrained: str,
        text: str = "instruction",
        task: str | None = None,
    ) -> None:
        super().__init__(task)
        self.text = text
        self.judge = load_open_clip(model, pretrained)

    def values(self, source: Tensor, edited: Tensor, batch: Mapping, before, after) -> Tensor:
        return 100.0 * self.judge.cosine(edited, list(batch[self.text])).clamp_min(0.0)
