"""Segmenters: find the object named by a phrase in a batch of images.

Why: an edit reward ("did the red triangle move left?") needs the object's mask, position and
heading in the *generated* image. The `Segmenter` protocol hides how that is done, so reward
code runs unchanged on ShapeWorld (`ColourSegmenter`: exact, cheap, CPU) and on real photos
(a future SAM + open_clip segmenter implementing the same call).

Conventions (shared with `lit_grpo.datamodules.shapeworld`): pixels with x right, y down,
pixel (row i, column j) centred at (j + 0.5, i + 0.5); boxes (x0, y0, x1, y1) with x1/y1
exclusive; angles in degrees, counter-clockwise as the viewer sees the image, 0 = pointing up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from lit_grpo.perception.detections import Detections

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: thin apexes stay attached
_SOFT_RADIUS = 2  # px around the mask where anti-aliased / blurred edge pixels are weighed
_RING = (3, 5)  # local background is fitted on pixels this many px (from, to) off the mask
_KNOWN_KINDS = ("circle", "square", "triangle")


@runtime_checkable
class Segmenter(Protocol):
    """Find the object named in each phrase in the matching image.

    `images` is float [N, 3, H, W] in [0, 1]; `phrases[i]` names one object in `images[i]`
    ("red triangle"). Returns `Detections` on the images' device. Implementations must not rely
    on ShapeWorld internals: the only contract is this call and the conventions above.
    """

    def __call__(self, images: Tensor, phrases: Sequence[str]) -> Detections: ...


@runtime_checkable
class SceneSegmenter(Protocol):
    """A segmenter that can also mark every object in an image (no phrase): `objects(images
    [N, 3, H, W]) -> [N, H, W] bool`. Region rewards use it for "the other objects"."""

    def objects(self, images: Tensor) -> Tensor: ...


class ColourSegmenter:
    """Segmenter for images of flat, saturated palette colours (ShapeWorld and the like).

    The mask is the largest 8-connected blob of pixels within `threshold` (RGB Euclidean
    distance) of the named palette colour. The default 0.3 is below the smallest distance
    between a palette colour and another palette colour (0.47) or a ShapeWorld background
    (0.5), yet leaves room for colour shifts of ~0.1 plus noise in generated images. Fewer
    than `min_pixels` pixels means not found. `palette` defaults to ShapeWorld's `COLORS`.

    Position, area and orientation come from soft weights rather than the hard mask: each pixel
    near the mask gets its estimated coverage, the projection of its colour onto the segment
    from the local background to the object's observed colour. That recovers sub-pixel
    centroids on anti-aliased or blurred edges. Orientation comes from the weighted moments:
    triangles use the principal axis oriented by the third moment (the apex side has the long
    tail), squares the 4-fold harmonic (mod 90), circles have none (NaN), other shape words
    get the triangle's 360-degree estimate.
    """

    def __init__(
        self,
        threshold: float = 0.3,
        min_pixels: int = 4,
        palette: Mapping[str, tuple[float, float, float]] | None = None,
    ) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = float(threshold)
        self.min_pixels = int(min_pixels)
        if palette is None:
            # Imported here: `lit_grpo.datamodules` pulls in Lightning, which reward code
            # that only needs `Detections` should not pay for.
            from lit_grpo.datamodules.shapeworld import COLORS as palette
        self.palette = {k.lower(): np.asarray(v, dtype=np.float32) for k, v in palette.items()}

    def parse(self, phrase: str) -> tuple[str, str | None]:
        """(colour, shape word or None) of a phrase like "the red triangle"."""
        words = re.findall(r"[a-z]+", phrase.lower())
        hits = [i for i, w in enumerate(words) if w in self.palette]
        if not hits:
            raise ValueError(
                f"no known colour in phrase {phrase!r}; known colours: {sorted(self.palette)}"
            )
        rest = words[hits[0] + 1 :]
        kinds = [w for w in rest if w in _KNOWN_KINDS]
        kind = kinds[0] if kinds else (rest[-1] if rest else None)
        return words[hits[0]], kind

    def __call__(self, images: Tensor, phrases: Sequence[str]) -> Detections:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if len(phrases) != images.shape[0]:
            raise ValueError(f"{len(phrases)} phrases for {images.shape[0]} images")
        parsed = [self.parse(p) for p in phrases]  # fail fast on an unknown colour
        n, _, h, w = images.shape
        arr = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
        found = np.zeros(n, dtype=bool)
        mask = np.zeros((n, h, w), dtype=bool)
        box = np.zeros((n, 4), dtype=np.float32)
        centre = np.zeros((n, 2), dtype=np.float32)
        angle = np.full(n, np.nan, dtype=np.float32)
        area = np.zeros(n, dtype=np.float32)
        for i, (colour, kind) in enumerate(parsed):
            det = self._detect(arr[i], colour, kind)
            if det is None:
                continue
            found[i] = True
            mask[i], box[i], centre[i], angle[i], area[i] = det
        out = Detections(*(torch.from_numpy(a) for a in (found, mask, box, centre, angle, area)))
        return out.to(images.device)

    def objects(self, images: Tensor) -> Tensor:
        """Every object's pixels [N, H, W] bool: within `threshold` of any palette colour
        (the `SceneSegmenter` call: what region rewards call "the other objects")."""
        pal = torch.tensor(np.stack(list(self.palette.values())), dtype=torch.float32)
        img = images.detach().float().permute(0, 2, 3, 1)  # [N, H, W, 3]
        dist = torch.cdist(img.reshape(-1, 3), pal.to(img.device)).min(-1).values
        return (dist < self.threshold).view(img.shape[:3])

    def _detect(self, img: np.ndarray, colour: str, kind: str | None):
        target = self.palette[colour]
        dist = np.linalg.norm(img - target, axis=-1)
        labels, count = ndimage.label(dist < self.threshold, structure=_EIGHT)
        if count == 0:
            return None
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        comp = labels == sizes.argmax()
        if sizes.max() < self.min_pixels:
            return None
        rows, cols = np.flatnonzero(comp.any(axis=1)), np.flatnonzero(comp.any(axis=0))
        box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        # Work in a window around the blob: dilations and moments stay cheap on big images.
        pad = _RING[1] + 1
        r0, c0 = max(rows[0] - pad, 0), max(cols[0] - pad, 0)
        r1, c1 = min(rows[-1] + 1 + pad, img.shape[0]), min(cols[-1] + 1 + pad, img.shape[1])
        win = (slice(r0, r1), slice(c0, c1))
        weights = self._soft_weights(img[win], comp[win], dist[win], target)
        if weights.sum() <= 0:  # degenerate colours: fall back to the hard mask
            weights = comp[win].astype(np.float64)
        ys, xs = np.mgrid[win]
        total = weights.sum()
        cx = float((weights * (xs + 0.5)).sum() / total)
        cy = float((weights * (ys + 0.5)).sum() / total)
        u, v = xs + 0.5 - cx, -(ys + 0.5 - cy)  # math axes (y up): ccw angles as seen
        heading = _orientation(weights, u, v, kind)
        return comp, box, (cx, cy), heading, float(total)

    def _soft_weights(self, img, comp, dist, target) -> np.ndarray:
        """Estimated coverage of the object per pixel (1 inside, fractional at edges)."""
        obj = img[comp][dist[comp] <= np.median(dist[comp])].mean(axis=0)  # observed colour
        near = ndimage.binary_dilation(comp, _EIGHT, iterations=_SOFT_RADIUS)
        bg = _local_background(img, comp)
        if bg is None:
            return comp.astype(np.float64)
        bg = bg[near]  # [P, 3], one background colour per pixel near the object
        axis = obj - bg
        norm2 = np.einsum("pc,pc->p", axis, axis)
        if norm2.min() < 0.1**2:  # object indistinguishable from its surroundings: hard mask
            return comp.astype(np.float64)
        rel = img[near] - bg
        a, resid = _blend(rel, axis, norm2)
        # A pixel counts only if it is best explained as a blend of this object and the
        # background, not of another palette colour (keeps neighbours' edges out).
        best_other = np.full(len(rel), np.inf)
        for col in self.palette.values():
            if np.linalg.norm(col - target) > 1e-6:
                ax = col - bg
                best_other = np.minimum(
                    best_other, _blend(rel, ax, np.einsum("pc,pc->p", ax, ax))[1]
                )
        keep = ((resid < self.threshold) & (resid <= best_other)) | comp[near]
        weights = np.zeros(comp.shape)
        weights[near] = np.where(keep, a, 0.0)
        return weights


def _blend(rel: np.ndarray, axis: np.ndarray, norm2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: blend fraction along `axis` (clipped to [0, 1]) and the distance off it."""
    a = np.clip(np.einsum("pc,pc->p", rel, axis) / norm2, 0.0, 1.0)
    return a, np.linalg.norm(rel - a[:, None] * axis, axis=1)


def _local_background(img: np.ndarray, comp: np.ndarray) -> np.ndarray | None:
    """Background colour [H, W, 3] around the blob: a plane in (x, y) per channel fitted to a
    ring of pixels a few px off it, so smooth gradients are followed; None if no ring."""
    inner = ndimage.binary_dilation(comp, _EIGHT, iterations=_RING[0] - 1)
    ring = ndimage.binary_dilation(comp, _EIGHT, iterations=_RING[1] - 1) & ~inner
    pixels = img[ring]
    if len(pixels) < 3:
        return None
    keep = np.linalg.norm(pixels - np.median(pixels, axis=0), axis=1) < 0.25  # drop neighbours
    ys, xs = np.nonzero(ring)
    ys, xs, pixels = ys[keep], xs[keep], pixels[keep]
    if len(pixels) < 8:
        return np.broadcast_to(np.median(img[ring], axis=0), img.shape)
    design = np.stack([np.ones(len(xs)), xs, ys], axis=1).astype(np.float64)
    coef = np.linalg.lstsq(design, pixels, rcond=None)[0]  # [3 (1, x, y), 3 channels]
    gy, gx = np.mgrid[: img.shape[0], : img.shape[1]]
    return coef[0] + gx[..., None] * coef[1] + gy[..., None] * coef[2]


def _orientation(w: np.ndarray, u: np.ndarray, v: np.ndarray, kind: str | None) -> float:
    """Heading in degrees from weighted central moments (u right, v up)."""
    if kind == "circle":
        return math.nan
    if kind == "square":
        m4 = np.sum(w * (u + 1j * v) ** 4)  # corners at 45 deg give a negative real part
        return math.degrees(np.angle(-m4)) / 4 % 90.0
    cuu, cvv, cuv = np.sum(w * u * u), np.sum(w * v * v), np.sum(w * u * v)
    phi = 0.5 * math.atan2(2 * cuv, cuu - cvv)  # major principal axis
    ex, ey = math.cos(phi), math.sin(phi)
    if np.sum(w * (u * ex + v * ey) ** 3) < 0:  # point the axis at the long (apex) tail
        ex, ey = -ex, -ey
    return math.degrees(math.atan2(-ex, ey)) % 360.0
