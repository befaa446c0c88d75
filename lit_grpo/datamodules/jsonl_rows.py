"""Reading and checking the rows of an edit jsonl file, before any training.

Every line is checked (docs/data.md has the schema): valid JSON, the required keys as
non-empty strings, a known task, an instruction that reads as its task
(`instructions.parse_instruction`), image / target / mask files that exist and decode (PIL's
`verify`, structure and PNG checksums, then a full decode, which is what catches a truncated
JPEG; `check_pixels=False` skips the decode), a mask the image's size, a box inside the
image. Each distinct file is checked once (expanded datasets name an image a dozen times). A bad row becomes one "file:line: what is wrong" line, all of a row's
problems at once; `report_bad_rows` stops with all of them or warns and goes on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lit_grpo.checks import ConfigError
from lit_grpo.datamodules.instructions import EditParams, InstructionError, parse_instruction
from lit_grpo.datamodules.shapeworld import TASKS

REQUIRED = ("image", "instruction", "task", "object")
OPTIONAL = ("target", "box", "mask")
IGNORED = ("id",)  # known and not used (`expand` carries annotation ids through)
MAX_LISTED = 50  # bad rows named in one message; the rest are counted


@dataclass(frozen=True)
class Row:
    """One checked row: resolved paths, the parsed edit, the source image's (width, height)."""

    origin: str
    image: Path
    instruction: str
    task: str
    object: str
    edit: EditParams
    size: tuple[int, int]
    target: Path | None = None
    box: tuple[float, float, float, float] | None = None
    mask: Path | None = None


class _BadRow(Exception):
    pass


def read_rows(
    path: str | Path,
    image_root: str = ".",
    require_target: bool = False,
    check_pixels: bool = True,
) -> tuple[list[Row], list[str], set[str]]:
    """(the good rows, "file:line: what is wrong" for each bad one, keys no row should have).
    Blank lines are skipped; line numbers count every line from 1."""
    path = Path(path)
    base = path.parent / image_root
    rows, bad, unknown = [], [], set()
    probe = ImageProbe(check_pixels)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            origin = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                value = _json_object(line)
                unknown |= set(value) - set(REQUIRED) - set(OPTIONAL) - set(IGNORED)
                rows.append(_check_row(value, base, origin, require_target, probe))
            except UnicodeDecodeError:
                bad.append(f"{origin}: not UTF-8 text")
            except _BadRow as err:
                bad.append(f"{origin}: {err}")
    return rows, bad, unknown


def _json_object(line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRow(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise _BadRow(f"expected a JSON object with {', '.join(REQUIRED)}")
    return value


def _check_row(value: dict, base: Path, origin: str, require_target: bool, probe) -> Row:
    missing = [k for k in REQUIRED if k not in value]
    if missing:
        raise _BadRow(f"missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    given = {k: value[k] for k in OPTIONAL if value.get(k) is not None}
    problems = [
        f"{k!r} must be a non-empty string"
        for k in (*REQUIRED, "target", "mask")
        if k in value and (k in REQUIRED or k in given) and not _text(value[k])
    ]
    if problems:
        raise _BadRow("; ".join(problems))
    task, text, obj = value["task"], value["instruction"], value["object"]
    edit = None
    if task not in TASKS:
        problems.append(f"unknown task {task!r} (expected {', '.join(TASKS)})")
    else:
        try:
            edit = parse_instruction(text, task, obj)
        except InstructionError as err:
            problems.append(f"instruction {text!r} does not read as a {task} edit: {err}")
    image = base / value["image"]
    size = probe(image, "image", problems)
    target = base / given["target"] if "target" in given else None
    if target is not None:
        probe(target, "target", problems)
    mask = base / given["mask"] if "mask" in given else None
    if mask is not None:
        mask_size = probe(mask, "mask", problems)
        if size and mask_size and mask_size != size:
            problems.append(f"mask {mask} is {_wxh(mask_size)}, the image {_wxh(size)}")
    box = given.get("box")
    if box is not None and size is not None:
        box = check_box(box, size, problems)
    if require_target and "target" not in given:
        problems.append("no 'target' image (SFT trains on target images)")
    if problems:
        raise _BadRow("; ".join(problems))
    return Row(origin, image, text, task, obj.strip(), edit, size, target, box, mask)


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} px"


class ImageProbe:
    """(width, height) of image files whose data checks out; a problem noted otherwise.
    Remembers each file's answer."""

    def __init__(self, check_pixels: bool):
        self.check_pixels = check_pixels
        self.seen: dict[Path, tuple[int, int] | str] = {}

    def __call__(self, path: Path, what: str, problems: list[str]) -> tuple[int, int] | None:
        if path not in self.seen:
            self.seen[path] = self._check(path)
        found = self.seen[path]
        if isinstance(found, str):
            problems.append(f"{what} {found}")
            return None
        return found

    def _check(self, path: Path) -> tuple[int, int] | str:
        if not path.is_file():
            return f"not found: {path}"
        try:
            with Image.open(path) as im:
                size = im.size
                im.verify()  # structure and PNG checksums, without decoding
            if self.check_pixels:
                with Image.open(path) as im:
                    im.load()  # a truncated JPEG passes verify() and fails here
        except Exception as err:  # PIL raises many types for a damaged file
            return f"{path} is not a readable image ({type(err).__name__}: {err})"
        return size


def check_box(box, size: tuple[int, int], problems: list[str]):
    """The box as 4 floats if it is 4 finite numbers inside an image of `size`; None and a
    problem noted otherwise."""
    w, h = size
    ok = (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        and all(math.isfinite(v) for v in box)
    )
    if not ok:
        problems.append(f"box {box!r} must be 4 numbers [x0, y0, x1, y1] in pixels")
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        problems.append(
            f"box {box} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} (the image "
            f"is {_wxh(size)}; x1, y1 exclusive)"
        )
        return None
    return x0, y0, x1, y1


def report_bad_rows(bad: list[str], total: int, path: Path, on_bad_row: str) -> None:
    """Raise one `ConfigError` listing the bad rows ("error"), or warn and go on ("skip")."""
    if not bad:
        return
    listed = "\n  ".join(bad[:MAX_LISTED])
    if len(bad) > MAX_LISTED:
        listed += f"\n  ... and {len(bad) - MAX_LISTED} more"
    if on_bad_row == "error":
        raise ConfigError(
            f"{len(bad)} of {total} rows of {path} are bad:\n  {listed}\nFix them, or set "
            "data.init_args.on_bad_row: skip to leave them out"
        )
    from lightning.pytorch.utilities import rank_zero_warn  # lazy: `expand` needs no Lightning

    rank_zero_warn(f"skipping {len(bad)} of {total} rows of {path}:\n  {listed}")
