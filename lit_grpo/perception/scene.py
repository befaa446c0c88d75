"""Every object of a photo from SAM's proposals: the rules behind `SamClipSegmenter.scene`.

Region rewards need "the other objects" of a scene (`SceneSegmenter.objects`). On a photo
they come from SAM's automatic proposals (`SamClipSegmenter.propose`, a point grid), which
hold far more than one mask per object: near-duplicates from neighbouring points, parts
(a cup's handle) beside wholes, and "stuff" (wall, floor, sky, table top). The rules:

1. quality, as SAM's own automatic mask generator filters its proposals: predicted IoU >=
   0.88 and stability score >= 0.95 at offset 1.0 (segment_anything's
   `SamAutomaticMaskGenerator` defaults; `stability_score` is its definition). Defaults
   taken from SAM's generator, not measured here: a random tiny SAM says nothing about
   real masks, and no SAM weights can be fetched on this project's machines.
2. size: at least `min_area` of the image (the target search's limit, 0.1 %); at most
   `max_area` (ours, 0.5) and touching at most `max_sides` of the image's four sides
   (ours, 2): a mask over half the frame, or spanning it (left, right and bottom: a
   floor or table top; left, right and top: a wall or sky), is the backdrop. A mistake here
   only moves pixels between the "others" and "background" regions, which the region
   reward scores alike (L1 to the source).
3. one mask per object (ours): largest first, a mask whose pixels lie for >= `contain`
   (0.9) inside the masks already kept is a duplicate or a part of them, and is dropped. A
   part is dropped rather than its whole so the objects' union keeps the whole object.

The target itself is not singled out: `objects()` has no phrase (the `SceneSegmenter`
contract, as `ColourSegmenter.objects`, whose masks include the target), and
`RegionReward` takes the edit region (the target's old, drawn and instructed places) out
of the objects before it calls the rest "others".
"""

from __future__ import annotations

import torch
from torch import Tensor


def stability_score(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """[M]: IoU of each mask logit map [M, H, W] cut at `threshold + offset` and at
    `threshold - offset` (SAM's stability score: 1 when the mask's edge is sharp)."""
    inner = (logits > threshold + offset).flatten(1).sum(1)
    outer = (logits > threshold - offset).flatten(1).sum(1)
    return inner / outer.clamp_min(1)


def sides_touched(masks: Tensor) -> Tensor:
    """[M] int: how many of the image's four sides each mask [M, H, W] reaches."""
    sides = (masks[:, 0, :], masks[:, -1, :], masks[:, :, 0], masks[:, :, -1])
    return torch.stack([s.any(1) for s in sides], 1).sum(1)


def distinct_objects(masks: Tensor, max_area: float, max_sides: int, contain: float) -> Tensor:
    """Indices of the masks [M, H, W] bool that are objects (rules 2-3 of the module
    docstring; `min_area` and quality are the proposals' own filters), largest first."""
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    pixels = masks.flatten(1).sum(1)  # [M]
    small = (pixels <= max_area * masks[0].numel()) & (sides_touched(masks) <= max_sides)
    order = torch.sort(pixels, descending=True, stable=True).indices
    covered = torch.zeros_like(masks[0])
    kept = []
    for i in order[small[order]].tolist():
        inside = (masks[i] & covered).sum()
        if inside < contain * pixels[i]:
            kept.append(i)
            covered |= masks[i]
    return torch.tensor(kept, dtype=torch.long)
