"""Edit instructions for real images: parse them into an edit spec, expand annotations into them.

Talk2Move builds its RL data from single-sided samples (an image and an instruction, no
target): template instructions over a few discrete levels per task, 800 translation images
expanded to 3,200 samples (4 directions each). Its summary names the 4 directions and "4
levels of rotation" but not the rotation angles or the scale factors; the levels here are
ShapeWorld's (our choice): rotations of 45, 90, 135 and 180 degrees (90 counter-clockwise is
the paper's example; the sense of each is drawn) and scale factors 0.5, 0.75, 1.5 and 2
(0.5 is the paper's example). The phrasings are ShapeWorld's templates
(`lit_grpo.datamodules.shapeworld.instruction`), so the embedded editor's vocabulary knows
every word but the object's.

`parse_instruction` reads what an instruction asks for, given its task: the direction of a
translation, the signed angle of a rotation, the factor of a scaling. It parses every
template phrasing exactly (tested over ShapeWorld's instructions) and free text that says the
same things plainly ("rotate the mug 90 degrees clockwise", "make the dog twice as big"); what
it cannot read is an `InstructionError` saying what is missing, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lit_grpo.datamodules.shapeworld import (
    DIRECTIONS,
    ROTATION_ANGLES,
    SCALE_FACTORS,
    TASKS,
    Edit,
    instruction,
)

_DIRECTION_WORDS = {
    "left": "left",
    "leftwards": "left",
    "right": "right",
    "rightwards": "right",
    "up": "up",
    "upward": "up",
    "upwards": "up",
    "down": "down",
    "downward": "down",
    "downwards": "down",
}
_CCW = {"counterclockwise", "anticlockwise", "ccw"}
_CW = {"clockwise", "cw"}
_ANGLE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:degrees?|deg\b|°)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# word factors; "three quarters" is read before "quarter"
_FACTOR_WORDS = (
    (re.compile(r"\bthree[ -]quarters?\b"), 0.75),
    (re.compile(r"\b(?:half|halve)\b"), 0.5),
    (re.compile(r"\b(?:a )?quarter\b"), 0.25),
    (re.compile(r"\b(?:twice|double)\b"), 2.0),
    (re.compile(r"\b(?:triple|thrice)\b"), 3.0),
)
_SMALLER = {"shrink", "smaller", "reduce", "decrease", "halve"}
_LARGER = {"enlarge", "bigger", "larger", "grow", "expand", "increase", "double", "triple"}


class InstructionError(ValueError):
    """An instruction that does not say what its task needs (direction, angle or factor)."""


@dataclass(frozen=True)
class EditParams:
    """What an instruction asks for, in ShapeWorld's batch fields: direction (dx, dy) unit,
    image axes (y down), (0, 0) unless translating; angle: signed degrees, + = counter-
    clockwise as seen, 0 unless rotating; factor: linear size factor, 1 unless scaling."""

    direction: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    factor: float = 1.0


def parse_instruction(text: str, task: str, obj: str | None = None) -> EditParams:
    """The edit `text` asks for, read as a `task` edit of the object phrase `obj`.

    The object phrase is cut out first (its own words and numbers, "the 2 cups", are not the
    edit's). Raises `InstructionError` naming what is missing or ambiguous.
    """
    if task not in TASKS:
        raise InstructionError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    s = " " + text.lower() + " "
    if obj and obj.strip():
        s = s.replace(obj.lower().strip(), " ")
    s = re.sub(r"(counter|anti)[ -]clockwise", r"\1clockwise", s)
    words = re.findall(r"[a-z]+", s)
    if task == "translate":
        found = sorted({_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS})
        if len(found) != 1:
            what = "no direction" if not found else f"several directions ({', '.join(found)})"
            raise InstructionError(f"{what}: a translation says one of left, right, up or down")
        return EditParams(direction=DIRECTIONS[found[0]])
    if task == "rotate":
        angles = _ANGLE.findall(s)
        if len(angles) != 1:
            what = "no angle" if not angles else f"several angles ({', '.join(angles)})"
            raise InstructionError(f"{what}: a rotation says 'N degrees'")
        ccw, cw = any(w in _CCW for w in words), any(w in _CW for w in words)
        if ccw == cw:
            what = "both senses" if ccw else "no sense"
            raise InstructionError(f"{what}: a rotation says clockwise or counterclockwise")
        degrees = float(angles[0])
        if not 0 < degrees <= 360:
            raise InstructionError(f"angle {degrees:g} degrees is outside (0, 360]")
        return EditParams(angle=degrees if ccw else -degrees)
    return EditParams(factor=_scale_factor(s, words))


def _scale_factor(s: str, words: list[str]) -> float:
    if re.search(r"\d\s*(?:%|percent)", s):
        raise InstructionError(
            "a percentage is ambiguous (by 50 % or to 50 %?): say 'to 0.5 times its size'"
        )
    values = []
    for pattern, value in _FACTOR_WORDS:
        if pattern.search(s):
            values.append(value)
            s = pattern.sub(" ", s)
    values += [float(n) for n in _NUMBER.findall(s)]
    if len(set(values)) != 1:
        what = "no factor" if not values else f"several factors ({', '.join(map(str, values))})"
        raise InstructionError(
            f"{what}: a scaling says one factor ('by 1.5', '2 times', 'half', 'twice')"
        )
    factor = values[0]
    if factor <= 0 or factor == 1:
        raise InstructionError(f"scale factor {factor:g} changes nothing; it must be > 0 and != 1")
    if (factor > 1 and _SMALLER.intersection(words)) or (
        factor < 1 and _LARGER.intersection(words)
    ):
        raise InstructionError(f"the words contradict the factor {factor:g} (grow or shrink?)")
    return factor


def edit_levels(task: str, rng: np.random.Generator) -> list[Edit]:
    """The 4 edits of a task an annotation expands into: the 4 directions; the 4 rotation
    angles, each with a sense drawn from `rng`; the 4 scale factors."""
    if task == "translate":
        return [Edit(task, 0, direction=d) for d in DIRECTIONS]
    if task == "rotate":
        senses = np.where(rng.integers(2, size=len(ROTATION_ANGLES)) == 1, 1.0, -1.0)
        return [Edit(task, 0, angle=float(s * a)) for s, a in zip(senses, ROTATION_ANGLES)]
    if task == "scale":
        return [Edit(task, 0, factor=f) for f in SCALE_FACTORS]
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


# annotation keys a sample does not inherit: the expansion writes its own
_NOT_CARRIED = ("instruction", "task", "target")


def expand_annotation(
    annotation: Mapping, tasks: Sequence[str], rng: np.random.Generator
) -> Iterator[dict]:
    """Samples `{**annotation, instruction, task}` of one `(image, object[, box, mask])`
    annotation: 4 per task (`edit_levels`), phrased by templates drawn from `rng`. Keys other
    than instruction, task and target are carried over (image, object, box, mask, ids)."""
    obj = str(annotation["object"]).strip()
    carried = {k: v for k, v in annotation.items() if k not in _NOT_CARRIED}
    for task in tasks:
        for edit in edit_levels(task, rng):
            yield {**carried, "instruction": instruction(rng, edit, obj), "task": task}
