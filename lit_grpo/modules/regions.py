"""Regions: where a method's per-condition region comes from, and who sees it.

A `Regions` component (`GRPOModule(regions=...)`) derives a region [B, H, W] from the
edited object segmented once in each source (`BatchRegions`) and the instruction, then may
hand it to the noise builder (`noise_regions`, at latent resolution) and to the rewards
(`observe`, at token resolution, beside the sampler's attention maps). RC-GRPO's edit
region is `lit_grpo.modules.rcgrpo.EditRegions`; InstructRL4Pix's target region is
`lit_grpo.modules.instructrl4pix.TargetRegions`.
"""

from collections.abc import Callable

from torch import Tensor

from lit_grpo.perception.detections import Detections
from lit_grpo.rewards.base import RewardInputs


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


class Regions:
    """The base of a region component (see module docstring): subclasses define `region`,
    and `observe` / `noise_regions` where their method uses the region there. The sampler
    records the instruction-to-image attention for the rewards (`capture_attention`)."""

    capture_attention = True

    def __init__(self):
        self._batches = BatchRegions(self.region)

    def region(self, before: Detections, batch: dict) -> Tensor:
        """The region [B, H, W] bool of each condition from its source detection."""
        raise NotImplementedError

    def __call__(self, segmenter, batch: dict) -> tuple[Detections, Tensor]:
        """(the object's detections in the B sources, their regions [B, H, W] bool),
        segmented once per batch."""
        return self._batches(segmenter, batch)

    def noise_regions(self, policy, segmenter, batch: dict, group_size: int) -> Tensor | None:
        """The regions [B * G, h, w] handed to the noise builder; None here."""
        return None

    def observe(
        self, scorer, policy, images: Tensor, batch: dict, repeats: int, attention: Tensor | None
    ) -> RewardInputs:
        """What the rewards see: the scorer's view plus the region at token resolution
        (`attention_region`, [N, rows, cols]) and the source detections."""
        before, region = self(scorer.segmenter, batch)
        return scorer.observe(
            images,
            batch,
            repeats,
            attention=attention,
            attention_region=token_regions(policy, region)
            .to(images.device)
            .repeat_interleave(repeats, 0),
            before=before,
            **self.reward_extras(policy, batch, repeats),
        )

    def reward_extras(self, policy, batch: dict, repeats: int) -> dict:
        """More `RewardInputs` fields for this method's rewards (none here)."""
        return {}


def token_regions(policy, region: Tensor) -> Tensor:
    """Pixel regions [B, H, W] -> their token cover [B, rows, cols]."""
    rows, cols = policy.token_grid(tuple(region.shape[-2:]))
    return policy.pixel_to_tokens(region).view(-1, rows, cols)
