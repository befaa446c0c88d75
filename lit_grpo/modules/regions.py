"""The per-batch source regions of RC-GRPO and InstructRL4Pix."""

from collections.abc import Callable

from torch import Tensor

from lit_grpo.perception.detections import Detections


class BatchRegions:
    """The edited object's detections in a batch's B sources and a region derived from them
    ([B, H, W] bool by `region(detections, batch)`), computed once per batch: sampling (RC-GRPO's
    noise) and scoring (the attention rewards, the scorer's `before`) of one step share them.
    A batch is recognised by its source tensor (identity): the next batch recomputes."""

    def __init__(self, region: Callable[[Detections, dict], Tensor]):
        self.region = region
        self._batch: tuple[Tensor, Detections, Tensor] | None = None

    def __call__(self, segmenter, batch: dict) -> tuple[Detections, Tensor]:
        source = batch["source"]
        if self._batch is None or self._batch[0] is not source:
            before = segmenter(source, batch["object"])
            self._batch = (source, before, self.region(before, batch))
        return self._batch[1], self._batch[2]
