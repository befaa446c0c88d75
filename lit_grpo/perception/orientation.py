"""Orientation estimators: an object's heading from its image and mask, for rotation edits.

The rotation reward and metrics compare `Detections.angle` before and after the edit
(`geometry.rotation_error`). ShapeWorld's `ColourSegmenter` reads the angle itself; a
segmenter for real images (`SamClipSegmenter`) asks an `OrientationEstimator` for it, so the
estimator can be swapped by `class_path` without touching the segmenter or the rewards.

Talk2Move estimates orientation with Orient-Anything, a learned model of an object's 3-D
facing, because its rotations of real objects are turns about the vertical axis ("rotate the
person 90 degrees"). The default here, `MaskAxisOrientation`, is ours: it reads the mask's
in-plane principal axis, which is what a ShapeWorld rotation changes, and says nothing about
a turn in depth. A user with such data plugs in a learned estimator (docs/data.md).

Angles follow the perception conventions: degrees, counter-clockwise as the viewer sees the
image, 0 = pointing up; NaN where the estimator cannot tell.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class OrientationEstimator(Protocol):
    """`estimator.headings(images [N, 3, H, W] in [0, 1], masks [N, H, W] bool) -> [N]`
    headings in degrees (ccw as seen, 0 = up; NaN where unreadable). The estimator may use the
    pixels, the mask or both; only differences of headings are scored, so its zero may be any
    fixed direction of the object.

    A named method rather than `__call__`: jsonargparse reads a protocol whose `__call__`
    returns a class (Tensor) as a factory of that class and refuses estimator class_paths."""

    def headings(self, images: Tensor, masks: Tensor) -> Tensor: ...


def mask_moments(mask: Tensor) -> tuple[float, float, float, float]:
    """(axis angle in [0, 180) degrees, elongation, skew, pixels) of a bool mask [H, W].

    The axis is the major principal axis of the pixel centres' second moments, as a heading
    of our convention modulo 180 (a vertical axis is 0, a horizontal one 90). Elongation is
    sqrt(major / minor variance) (1 for a disc); skew is the standardised third moment along
    the axis pointing at `axis angle` (positive: the longer tail lies that way).
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if xs.numel() < 3:
        return math.nan, math.nan, math.nan, float(xs.numel())
    u = xs.double() + 0.5
    v = -(ys.double() + 0.5)  # math axes (y up): counter-clockwise as seen
    u, v = u - u.mean(), v - v.mean()
    cuu, cvv, cuv = (u * u).mean(), (v * v).mean(), (u * v).mean()
    phi = 0.5 * torch.atan2(2 * cuv, cuu - cvv)  # major axis, radians ccw from +x
    half = (cuu - cvv) / 2
    root = torch.sqrt(half * half + cuv * cuv)
    major, minor = (cuu + cvv) / 2 + root, (cuu + cvv) / 2 - root
    elongation = math.sqrt(major / minor) if minor > 0 else math.inf
    ex, ey = torch.cos(phi), torch.sin(phi)
    # twice: -1e-15 % 180 rounds to 180.0, which must read as 0
    heading = math.degrees(math.atan2(-ex.item(), ey.item())) % 180.0 % 180.0
    # the unit vector of `heading` (mod 180): flip (ex, ey) onto it before measuring the skew
    hx, hy = -math.sin(math.radians(heading)), math.cos(math.radians(heading))
    proj = u * hx + v * hy
    skew = ((proj**3).mean() / major**1.5).item() if major > 0 else 0.0
    return heading, elongation, skew, float(xs.numel())


class MaskAxisOrientation:
    """The heading of a mask's principal axis, its head told by the skew (ours).

    A principal axis has no head: alone it gives the angle modulo 180, so a 180-degree turn
    would read as no turn and a 90-degree one in either sense alike. The head is taken on the
    side of the mask's longer tail (the sign of the third moment along the axis: the apex of
    a triangle, the neck of a bottle seen from the side). A rigid in-plane rotation turns
    that head with the object, so differences of headings are right even where the head is
    not the object's front. Where the mask cannot say, the heading is NaN (the rotation
    reward then scores a miss, never a coin flip): elongation below `min_elongation` (no
    axis: a disc, a square) or |skew| below `min_skew` (no head: a rectangle, an ellipse).
    `mask_moments` gives the axis modulo 180 of such masks.

    Args:
        min_elongation: sqrt(major / minor variance) needed for an axis (ours: 1.1).
        min_skew: |standardised third moment| needed for a head (ours: 0.1; a triangle
            along its height has 0.57, a rasterised rectangle about 0).
        min_pixels: smaller masks are unreadable.
    """

    def __init__(self, min_elongation: float = 1.1, min_skew: float = 0.1, min_pixels: int = 8):
        if min_elongation < 1:
            raise ValueError(f"min_elongation must be >= 1, got {min_elongation}")
        if min_skew < 0:
            raise ValueError(f"min_skew must be >= 0, got {min_skew}")
        self.min_elongation, self.min_skew, self.min_pixels = min_elongation, min_skew, min_pixels

    def headings(self, images: Tensor, masks: Tensor) -> Tensor:
        if masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
        out = torch.full((masks.shape[0],), math.nan)
        for i, mask in enumerate(masks.detach().bool().cpu()):
            axis, elongation, skew, pixels = mask_moments(mask)
            if (
                pixels < self.min_pixels
                or not elongation >= self.min_elongation
                or not abs(skew) >= self.min_skew
            ):
                continue
            out[i] = axis if skew > 0 else (axis + 180.0) % 360.0
        return out.to(masks.device)
