"""ShapeWorld: a tiny procedural world of coloured shapes with exact, checkable edits.

Why: RL post-training of an image editor needs rewards we can trust. In ShapeWorld every
instruction has an exact answer (the target is rendered from the edited scene geometry), so
rewards, segmenters and metrics can be verified against ground truth, cheaply, on a CPU.

A scene is a muted vertical-gradient background plus 1-3 non-overlapping shapes of distinct,
saturated palette colours, so "the red triangle" is unique and no background pixel can be
mistaken for a palette colour (background saturation <= 0.15, value in [0.4, 0.65]; every
background colour is ~0.5 (> 0.45, tested) RGB distance from every palette colour).

Scenes, their geometry conventions and the renderer are in
`lit_grpo.datamodules.shapeworld_scenes` (re-exported here).

Edits (`Edit`): `translate` moves the target by `move_fraction * resolution` px left, right,
up or down; `rotate` turns the target (always a triangle) by +-45/90/135/180 deg (+ = ccw, as
seen); `scale` multiplies its linear size by 0.5/0.75/1.5/2 (its area by factor**2). Scenes and
edits are re-drawn (deterministically) until the edited object is inside the frame (>= 1 px
margin) and clear of the others (gap >= 0.05 * resolution), before and after the edit. A
scene whose shapes do not fit is re-drawn whole, so 1, 2 and 3 shapes occur about 45/37/18 %
(`objects=(min, max)` bounds the count: (2, 3) makes multi-object scenes only).

Randomness: sample `index` of split `s` uses `np.random.default_rng(np.random.SeedSequence(
[seed, s, index]))` with s = train 0, val 1, test 2. Distinct (seed, split, index) triples give
independent streams, so splits never share samples, and a sample never depends on iteration
order, workers or other samples. The task is the stream's first draw: `tasks[rng.integers(
len(tasks))]` (i.i.d., not round-robin).

Speed (measured, one loaded CPU core): `__getitem__` takes about 1.0 ms at 32 px, 1.3 ms at
64 px and 2.4 ms at 128 px, so samples are rendered on the fly, never cached.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import replace

import numpy as np
import torch

from lit_grpo.datamodules.shapeworld_scenes import (  # noqa: F401 (re-exported)
    COLORS,
    DIRECTIONS,
    TASKS,
    Colour,
    Edit,
    Scene,
    Shape,
    apply_edit,
    edited_shape,
    render,
    shape_extent,
    shape_vertices,
)

SHAPES = ("circle", "square", "triangle")
SPLITS = {"train": 0, "val": 1, "test": 2}
ROTATION_ANGLES = (45, 90, 135, 180)
SCALE_FACTORS = (0.5, 0.75, 1.5, 2.0)
MIN_RESOLUTION = 16
# the largest image side a data module accepts (ShapeWorld's and JsonlDataModule's): above
# what the supported backbones edit at (FLUX.1 Kontext and Qwen-Image-Edit: about 1024 px),
# and a GRPO batch's images alone grow with its square (32 rollouts at 4096 px: 6.4 GB of
# float32 pixels) while the embedded editor's attention grows faster. A bound on nonsense,
# not a memory estimate: a side under it can still be too big for a machine.
MAX_RESOLUTION = 2048

_COLOUR_NAMES = tuple(COLORS)
_KIND_SCALE = {"circle": 1.0, "square": 1.2, "triangle": 1.4}  # size / circle-equivalent R
_R_RANGE = (0.12, 0.18)  # R / resolution for shapes that are not scaled
_R_SCALE_LIMITS = (0.10, 0.25)  # R / resolution before and after a scale edit
_EDGE_MARGIN = 1.0  # px between a shape and the frame border
_GAP_FRACTION = 0.05  # gap between bounding disks, as a fraction of the resolution
_MAX_SCENE_ATTEMPTS = 1000
_PLACE_CANDIDATES = 32  # centres tried at once for each non-target shape

# Instruction templates. Every phrasing names the object as "<colour> <shape>".
_DIRECTION_WORDS = {
    "left": ("left", "to the left"),
    "right": ("right", "to the right"),
    "up": ("up", "upwards"),
    "down": ("down", "downwards"),
}
_TRANSLATE_TEMPLATES = tuple(
    f"{verb} the {{obj}} {{dir}}" for verb in ("move", "shift", "slide", "drag")
)
_SENSE_WORDS = {1: ("counterclockwise", "anticlockwise"), -1: ("clockwise",)}
_ROTATE_TEMPLATES = (
    "rotate the {obj} {deg} degrees {sense}",
    "turn the {obj} by {deg} degrees {sense}",
    "rotate the {obj} {sense} by {deg} degrees",
    "spin the {obj} {deg} degrees {sense}",
)
_SCALE_TEMPLATES = {
    None: ("scale the {obj} by {f}", "resize the {obj} to {f} times its size"),
    0.5: ("shrink the {obj} to half its size", "make the {obj} half as big"),
    0.75: (
        "shrink the {obj} to three quarters of its size",
        "shrink the {obj} to {f} times its size",
    ),
    1.5: ("make the {obj} {f} times bigger", "enlarge the {obj} by a factor of {f}"),
    2.0: (
        "make the {obj} {f} times bigger",
        "make the {obj} twice as big",
        "double the size of the {obj}",
    ),
}


def _format_number(x: float) -> str:
    return f"{x:g}"


def _template_words(*texts: str) -> set[str]:
    return {w for t in texts for w in re.sub(r"\{\w+\}", " ", t).split()}


def _build_vocabulary() -> tuple[str, ...]:
    """Every word a template can emit, so a word-level text encoder needs no tokenizer."""
    words = _template_words(*_TRANSLATE_TEMPLATES, *_ROTATE_TEMPLATES)
    words |= _template_words(*(t for ts in _SCALE_TEMPLATES.values() for t in ts))
    words |= _template_words(*(p for ps in _DIRECTION_WORDS.values() for p in ps))
    words |= _template_words(*(p for ps in _SENSE_WORDS.values() for p in ps))
    words |= set(COLORS) | set(SHAPES)
    words |= {_format_number(a) for a in ROTATION_ANGLES}
    words |= {_format_number(f) for f in SCALE_FACTORS}
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _build_vocabulary()


def _sample_background(rng: np.random.Generator) -> tuple[Colour, Colour]:
    """Two muted colours (HSV saturation <= 0.15, value 0.4-0.65): never palette-like."""
    top, bottom = (
        colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.15), rng.uniform(0.4, 0.65))
        for _ in range(2)
    )
    return top, bottom


def _sample_edit(rng: np.random.Generator, task: str, target: int) -> Edit:
    if task == "translate":
        return Edit(task, target, direction=tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))])
    if task == "rotate":
        sense = 1.0 if rng.integers(2) else -1.0
        return Edit(task, target, angle=sense * ROTATION_ANGLES[rng.integers(len(ROTATION_ANGLES))])
    return Edit(task, target, factor=SCALE_FACTORS[rng.integers(len(SCALE_FACTORS))])


def _sample_size_angle(rng, kind: str, colour: str, r_range, resolution: int) -> Shape:
    """A shape centred at the origin (its centre is chosen later, from the valid range)."""
    size = rng.uniform(*r_range) * _KIND_SCALE[kind] * resolution
    angle = rng.uniform(0, {"square": 90, "triangle": 360}[kind]) if kind != "circle" else 0.0
    return Shape(kind, colour, 0.0, 0.0, float(size), float(angle))


def _centre_range(extents, resolution: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Centres for which every extent (relative to the centre) is inside the frame margin."""
    e = np.asarray(extents)
    lo = _EDGE_MARGIN - e[:, :2].min(axis=0)
    hi = resolution - _EDGE_MARGIN - e[:, 2:].max(axis=0)
    return None if np.any(hi < lo) else (lo, hi)


def _place(rng, kinds, colours, edit, resolution, move_fraction) -> list[Shape] | None:
    """Place the target (inside the frame before and after the edit), then the others clear of
    both of its states; None if they do not fit (the caller re-draws the scene)."""
    r_range = _R_RANGE
    if edit.task == "scale":
        lo, hi = _R_SCALE_LIMITS
        r_range = (max(lo, lo / edit.factor), min(hi, hi / edit.factor))
    t = edit.target
    before = _sample_size_angle(rng, kinds[t], colours[t], r_range, resolution)
    after = edited_shape(before, edit, resolution, move_fraction)
    valid = _centre_range([shape_extent(before), shape_extent(after)], resolution)
    if valid is None:
        return None
    cx, cy = rng.uniform(*valid)
    before = replace(before, cx=float(cx), cy=float(cy))
    after = replace(after, cx=after.cx + float(cx), cy=after.cy + float(cy))
    obstacles = [before, after]
    placed = {t: before}
    gap = _GAP_FRACTION * resolution
    for i, (kind, colour) in enumerate(zip(kinds, colours)):
        if i == t:
            continue
        shape = _sample_size_angle(rng, kind, colour, _R_RANGE, resolution)
        valid = _centre_range([shape_extent(shape)], resolution)
        if valid is None:
            return None
        centres = rng.uniform(*valid, size=(_PLACE_CANDIDATES, 2))
        ok = np.ones(_PLACE_CANDIDATES, dtype=bool)
        for o in obstacles:
            dist = np.hypot(centres[:, 0] - o.cx, centres[:, 1] - o.cy)
            ok &= dist >= shape.size + o.size + gap
        if not ok.any():
            return None
        cx, cy = centres[np.argmax(ok)]
        placed[i] = replace(shape, cx=float(cx), cy=float(cy))
        obstacles.append(placed[i])
    return [placed[i] for i in range(len(kinds))]


def instruction(rng: np.random.Generator, edit: Edit, obj: str) -> str:
    """One phrasing of `edit` applied to the object phrase `obj`, drawn from the templates with
    `rng` (also what `lit_grpo.datamodules.instructions` expands real-image annotations with)."""
    if edit.task == "translate":
        phrase = _DIRECTION_WORDS[edit.direction]
        d = phrase[rng.integers(len(phrase))]
        template = _TRANSLATE_TEMPLATES[rng.integers(len(_TRANSLATE_TEMPLATES))]
        return template.format(obj=obj, dir=d)
    if edit.task == "rotate":
        senses = _SENSE_WORDS[1 if edit.angle > 0 else -1]
        sense = senses[rng.integers(len(senses))]
        template = _ROTATE_TEMPLATES[rng.integers(len(_ROTATE_TEMPLATES))]
        return template.format(obj=obj, deg=_format_number(abs(edit.angle)), sense=sense)
    templates = _SCALE_TEMPLATES[None] + _SCALE_TEMPLATES[edit.factor]
    template = templates[rng.integers(len(templates))]
    return template.format(obj=obj, f=_format_number(edit.factor))


def _box(mask: np.ndarray) -> list[float]:
    """(x0, y0, x1, y1) of a bool mask in pixels, x1/y1 exclusive; zeros if empty."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


class ShapeWorld(torch.utils.data.Dataset):
    """Seeded, generated-on-the-fly (source, instruction, target) editing triples."""

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        resolution: int = 32,
        tasks: tuple[str, ...] = TASKS,
        seed: int = 0,
        move_fraction: float = 0.25,
        objects: tuple[int, int] = (1, 3),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in TASKS]
        if not tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"resolution must be within {MIN_RESOLUTION}..{MAX_RESOLUTION} px, got "
                f"{resolution} (lit_grpo.datamodules.shapeworld.MAX_RESOLUTION: no supported "
                "backbone edits above it)"
            )
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not 0.0 < move_fraction <= 0.4:
            raise ValueError(f"move_fraction must be in (0, 0.4], got {move_fraction}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split, self.size, self.resolution = split, int(size), int(resolution)
        lo, hi = (int(k) for k in objects)
        if not 1 <= lo <= hi <= 3:
            raise ValueError(
                f"objects must be (min, max) shapes with 1 <= min <= max <= 3, got {objects}"
            )
        self.tasks, self.seed, self.move_fraction = tasks, int(seed), float(move_fraction)
        self.objects = (lo, hi)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> tuple[Scene, Edit, str]:
        """The scene, edit and instruction of sample `index` (pure function of the args)."""
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapeWorld of size {self.size}")
        seq = np.random.SeedSequence([self.seed, SPLITS[self.split], index])
        rng = np.random.default_rng(seq)
        task = self.tasks[rng.integers(len(self.tasks))]
        background = _sample_background(rng)
        for _ in range(_MAX_SCENE_ATTEMPTS):
            n = int(rng.integers(self.objects[0], self.objects[1] + 1))
            kinds = [SHAPES[k] for k in rng.integers(len(SHAPES), size=n)]
            colours = [_COLOUR_NAMES[k] for k in rng.permutation(len(_COLOUR_NAMES))[:n]]
            edit = _sample_edit(rng, task, int(rng.integers(n)))
            if task == "rotate":
                kinds[edit.target] = "triangle"  # only triangles have a readable heading
            shapes = _place(rng, kinds, colours, edit, self.resolution, self.move_fraction)
            if shapes is not None:
                break
        else:  # pragma: no cover - only reachable with extreme move_fraction/resolution
            raise RuntimeError(f"could not sample a valid {task} scene for index {index}")
        target = shapes[edit.target]
        text = instruction(rng, edit, f"{target.colour} {target.kind}")
        return Scene(background, tuple(shapes)), edit, text

    def __getitem__(self, index: int) -> dict:
        scene, edit, text = self.scene(index)
        after = apply_edit(scene, edit, self.resolution, self.move_fraction)
        source, cov_before = render(scene, self.resolution)
        target, cov_after = render(after, self.resolution)
        t = edit.target
        mask_before, mask_after = cov_before[t] >= 0.5, cov_after[t] >= 0.5
        s0, s1 = scene.shapes[t], after.shapes[t]
        direction = DIRECTIONS[edit.direction] if edit.task == "translate" else (0.0, 0.0)
        return {
            "source": torch.from_numpy(np.ascontiguousarray(source.transpose(2, 0, 1))),
            "target": torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1))),
            "instruction": text,
            "object": f"{s0.colour} {s0.kind}",
            "task": edit.task,
            "direction": torch.tensor(direction, dtype=torch.float32),
            "angle": torch.tensor(edit.angle, dtype=torch.float32),
            "factor": torch.tensor(edit.factor, dtype=torch.float32),
            "mask_before": torch.from_numpy(mask_before),
            "mask_after": torch.from_numpy(mask_after),
            "box_before": torch.tensor(_box(mask_before), dtype=torch.float32),
            "box_after": torch.tensor(_box(mask_after), dtype=torch.float32),
            "centre_before": torch.tensor((s0.cx, s0.cy), dtype=torch.float32),
            "centre_after": torch.tensor((s1.cx, s1.cy), dtype=torch.float32),
            "index": int(index),
        }
