"""ShapeWorld's scenes: shapes, edits, their geometry and the anti-aliased renderer.

What a scene is and how it is drawn; `lit_grpo.datamodules.shapeworld` samples scenes, edits
and instructions from it and serves them as a dataset.

Geometry conventions (all in pixels of the `resolution` x `resolution` image):

- x points right, y points down; pixel (row i, column j) covers [j, j+1) x [i, i+1) and has its
  centre at (j + 0.5, i + 0.5).
- `Shape.cx, cy` is the area centroid of the shape.
- `Shape.size` is the distance from the centroid to the farthest point of the shape: circle
  radius, square half-diagonal, triangle centroid-to-apex. Every shape lies in the disk of
  radius `size` around its centre (used for the no-overlap test).
- `Shape.angle` is in degrees, counter-clockwise *as the viewer sees it* (with y down, +90 turns
  an up-pointing triangle to point left). 0 = triangle apex up, square axis-aligned. Triangles
  use [0, 360), squares [0, 90) (4-fold symmetric), circles always 0.
- The triangle is a tall isosceles "pointer": apex at (0, size) above the centroid, base
  corners at (+-0.6 size, -0.5 size), apex angle ~44 deg, so its heading is readable over 360.
- Sizes scale with the resolution: a shape's circle-equivalent radius is 0.12-0.18 of the side
  (~4-6 px at 32 px; squares x1.2 and triangles x1.4 to balance areas), 0.10-0.25 around a
  scale edit.

"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

Colour = tuple[float, float, float]

COLORS: dict[str, Colour] = {
    "red": (0.9, 0.05, 0.1),
    "green": (0.15, 0.85, 0.15),
    "blue": (0.1, 0.25, 1.0),
    "yellow": (1.0, 0.95, 0.15),
    "purple": (0.6, 0.1, 0.9),
    "orange": (1.0, 0.5, 0.0),
    "cyan": (0.0, 0.85, 0.9),
    "white": (1.0, 1.0, 1.0),
}
TASKS = ("translate", "rotate", "scale")
# unit (dx, dy) in image coordinates (y down)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

_TRIANGLE = ((0.0, 1.0), (-0.6, -0.5), (0.6, -0.5))  # unit size, math axes (y up)
_SQUARE = tuple((math.cos(a), math.sin(a)) for a in np.radians([45, 135, 225, 315]))


@dataclass(frozen=True)
class Shape:
    """One shape; geometry conventions in the module docstring."""

    kind: str
    colour: str
    cx: float
    cy: float
    size: float
    angle: float


@dataclass(frozen=True)
class Edit:
    """An edit of `Scene.shapes[target]`; `angle` is signed degrees, + = ccw as seen."""

    task: str
    target: int
    direction: str | None = None
    angle: float = 0.0
    factor: float = 1.0


@dataclass(frozen=True)
class Scene:
    background: tuple[Colour, Colour]  # (top, bottom) colours of the vertical gradient
    shapes: tuple[Shape, ...]


def shape_vertices(shape: Shape) -> np.ndarray:
    """Polygon corners [K, 2] as (x, y) image coordinates; empty for a circle."""
    return np.array(_vertices(shape)).reshape(-1, 2)


def _vertices(shape: Shape) -> list[tuple[float, float]]:
    if shape.kind == "circle":
        return []
    unit = _TRIANGLE if shape.kind == "triangle" else _SQUARE
    a = math.radians(shape.angle)
    c, s = shape.size * math.cos(a), shape.size * math.sin(a)
    # rotate ccw in math axes (y up), then flip y to image axes (y down)
    return [(shape.cx + u * c - v * s, shape.cy - (u * s + v * c)) for u, v in unit]


def shape_extent(shape: Shape) -> tuple[float, float, float, float]:
    """Exact geometric bounding box (x0, y0, x1, y1) of the shape, in pixels."""
    if shape.kind == "circle":
        r = shape.size
        return shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r
    xs, ys = zip(*_vertices(shape))
    return min(xs), min(ys), max(xs), max(ys)


def _coverage(shape: Shape, resolution: int, supersample: int) -> tuple[np.ndarray, tuple]:
    """Box-filtered coverage on the shape's bounding pixel block (only that block is sampled)."""
    x0, y0, x1, y1 = shape_extent(shape)
    c0, r0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
    c1, r1 = max(min(math.ceil(x1), resolution), c0), max(min(math.ceil(y1), resolution), r0)
    block = (slice(r0, r1), slice(c0, c1))
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(c0, c1)[:, None] + offsets).ravel()[None, :]
    ys = (np.arange(r0, r1)[:, None] + offsets).ravel()[:, None]
    if shape.kind == "circle":
        inside = (xs - shape.cx) ** 2 + (ys - shape.cy) ** 2 <= shape.size**2
    else:
        v = shape_vertices(shape)
        w = np.roll(v, -1, axis=0)
        sign = np.sign(np.sum(v[:, 0] * w[:, 1] - w[:, 0] * v[:, 1]))  # orientation of the polygon
        inside = np.ones((ys.shape[0], xs.shape[1]), dtype=bool)
        for (ax, ay), (bx, by) in zip(v, w):
            inside &= sign * ((bx - ax) * (ys - ay) - (by - ay) * (xs - ax)) >= 0
    h, wd = r1 - r0, c1 - c0
    return inside.reshape(h, supersample, wd, supersample).mean(axis=(1, 3)), block


def render(scene: Scene, resolution: int, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased image float32 [H, W, 3] in [0, 1] and per-shape coverage float32 [S, H, W].

    Shapes are alpha-composited with their coverage; a pixel a shape does not touch is left
    bit-for-bit unchanged, so an edit changes the image only where the target was or is.
    """
    top, bottom = np.asarray(scene.background[0]), np.asarray(scene.background[1])
    t = ((np.arange(resolution) + 0.5) / resolution)[:, None]
    rows = top[None, :] * (1.0 - t) + bottom[None, :] * t
    image = np.repeat(rows[:, None, :], resolution, axis=1)
    coverage = np.zeros((len(scene.shapes), resolution, resolution), dtype=np.float32)
    for i, shape in enumerate(scene.shapes):
        cov, block = _coverage(shape, resolution, supersample)
        coverage[i][block] = cov
        a = cov[..., None]
        image[block] = image[block] * (1.0 - a) + np.asarray(COLORS[shape.colour]) * a
    return image.astype(np.float32), coverage


def edited_shape(shape: Shape, edit: Edit, resolution: int, move_fraction: float) -> Shape:
    """`shape` after `edit` (the move of a translation is move_fraction * resolution)."""
    if edit.task == "translate":
        if edit.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {edit.direction!r}; known: {list(DIRECTIONS)}")
        dx, dy = DIRECTIONS[edit.direction]
        step = move_fraction * resolution
        return replace(shape, cx=shape.cx + dx * step, cy=shape.cy + dy * step)
    if edit.task == "rotate":
        period = {"triangle": 360.0, "square": 90.0}.get(shape.kind)
        return (
            shape if period is None else replace(shape, angle=(shape.angle + edit.angle) % period)
        )
    if edit.task == "scale":
        return replace(shape, size=shape.size * edit.factor)
    raise ValueError(f"unknown task {edit.task!r}; known: {TASKS}")


def apply_edit(scene: Scene, edit: Edit, resolution: int, move_fraction: float) -> Scene:
    """The scene after `edit`; the move distance of a translation is move_fraction*resolution."""
    shapes = list(scene.shapes)
    shapes[edit.target] = edited_shape(shapes[edit.target], edit, resolution, move_fraction)
    return Scene(scene.background, tuple(shapes))
