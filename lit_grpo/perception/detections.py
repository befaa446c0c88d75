"""What a segmenter found: the named object's mask, box, centre, heading and area, batched.

The one record that segmenters produce and that geometry, rewards and metrics read. Pixel
conventions (x right, y down, angles in degrees ccw as the viewer sees them, 0 = pointing up)
are the segmenters' (`lit_grpo.perception.segmenters`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Detections:
    """Batched detections; rows with `found` False hold zeros (and a NaN angle)."""

    found: Tensor  # bool [N]
    mask: Tensor  # bool [N, H, W]
    box: Tensor  # float [N, 4] (x0, y0, x1, y1) px of the mask, x1/y1 exclusive
    centre: Tensor  # float [N, 2] (x, y) px, sub-pixel
    angle: Tensor  # float [N] degrees, ccw as seen; NaN if unreadable or not found
    area: Tensor  # float [N] px (soft: anti-aliased edge pixels count fractionally)

    def __len__(self) -> int:
        return self.found.shape[0]

    def to(self, device: torch.device | str) -> Detections:
        return Detections(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def repeat_interleave(self, repeats: int) -> Detections:
        """Each row `repeats` times in a row (one source's detection per rollout of its group)."""
        return Detections(
            **{f.name: getattr(self, f.name).repeat_interleave(repeats, 0) for f in fields(self)}
        )
