"""`python -m lit_grpo expand`: (image, object) annotations -> template edit samples (jsonl).

Talk2Move trains its RL stage on single-sided samples: an image and a template instruction,
no target (800 translation images became 3,200 samples). Each annotation line here,
`{"image": ..., "object": ..., "box"?: ..., "mask"?: ...}`, becomes 4 samples per task:
the 4 directions, 4 rotation angles (45, 90, 135, 180 degrees, the sense drawn), 4 scale
factors (0.5, 0.75, 1.5, 2) (`lit_grpo.datamodules.instructions`). The output rows are
`JsonlDataModule` rows; their paths are rewritten relative to the output file's folder.

Without annotations, `--images DIR --objects "cup,dog"` finds each named object in each photo
of a folder with `SamClipSegmenter` (local SAM and open_clip weights): its detection's box
and mask (a PNG written under `--masks`) become the annotation. An object not found in a
photo is skipped, named on stderr and counted; it never becomes a row.
"""

import argparse
import sys

HELP = (
    "expand (image, object) annotations, or the objects found in a folder of photos, into "
    "template edit samples (a jsonl for training)"
)

EPILOG = """\
an annotation line: {"image": "imgs/0001.jpg", "object": "mug", "box": [12, 40, 96, 130]}
  (paths relative to the annotation file's folder; other keys are carried into the samples)
each annotation gives 4 samples per task, phrased by ShapeWorld's templates:
  translate  left, right, up, down             "move the mug to the left"
  rotate     45, 90, 135, 180 deg, sense drawn  "rotate the mug 90 degrees clockwise"
  scale      x0.5, x0.75, x1.5, x2              "make the mug twice as big"
the phrasings and senses are drawn from (--seed, line number): the same input and seed give
the same file, and adding lines changes no other line's samples.

without annotations: --images DIR --objects "cup,dog" finds each object in each photo of DIR
  with SAM + open_clip (local weights, --sam and --clip); its box and mask (a PNG under
  --masks) make the annotation; an object not found in a photo is skipped and reported

example:
  python -m lit_grpo expand --annotations data/objects.jsonl --out data/train.jsonl
  python -m lit_grpo expand --annotations a.jsonl --out rot.jsonl --tasks rotate --seed 3
  python -m lit_grpo expand --images photos/ --objects "cup,dog" --sam sam_vit_b_01ec64.pth \\
      --clip open_clip_vit_b_32.bin --out data/train.jsonl
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_grpo expand",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--annotations", help="jsonl of (image, object) lines")
    source.add_argument("--images", help="a folder of photos to find --objects in (no annotations)")
    parser.add_argument("--out", required=True, help="the samples jsonl to write")
    found = parser.add_argument_group("finding objects in --images (SamClipSegmenter)")
    found.add_argument("--objects", help='object names, comma-separated: "cup,red mug,dog"')
    found.add_argument("--sam", help="local SAM checkpoint (.pth)")
    found.add_argument("--sam-model", default="vit_b", help="its architecture (vit_b)")
    found.add_argument("--clip", help="local open_clip weights")
    found.add_argument("--clip-model", default="ViT-B-32", help="their architecture (ViT-B-32)")
    found.add_argument(
        "--threshold", type=float, default=0.2, help="CLIP score that counts as found (0.2)"
    )
    found.add_argument("--masks", help="folder for the found masks (default: OUT's stem + _masks)")
    found.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["translate", "rotate", "scale"],
        choices=["translate", "rotate", "scale"],
        help="tasks to expand into (default: all three)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of phrasings and senses (0)")
    parser.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        default="error",
        help="a bad annotation line, or a file of --images that is not an image, stops the "
        "command (error, default) or is left out (skip)",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite --out (and --masks) if it exists"
    )
    args = parser.parse_args(argv)
    finding = ("objects", "sam", "clip", "masks", "device")
    if args.images is None:
        given = [f"--{k}" for k in finding if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --images, not with --annotations")
    else:
        needed = [f"--{k}" for k in ("objects", "sam", "clip") if not getattr(args, k)]
        if needed:
            parser.error(f"--images needs {', '.join(needed)}")

    import os
    from pathlib import Path

    import numpy as np

    from lit_grpo.checks import ConfigError, ensure_file, ensure_writable_dir
    from lit_grpo.datamodules.instructions import expand_annotation
    from lit_grpo.datamodules.jsonl_rows import MAX_LISTED

    out = Path(args.out).expanduser()
    if args.annotations is not None:
        src = ensure_file(args.annotations, "annotation file (--annotations)", "Pass a jsonl file.")
        if out.resolve() == src.resolve():
            parser.error("--out must not be the annotation file")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    ensure_writable_dir(out.parent, "output directory (--out)")
    tasks = list(dict.fromkeys(args.tasks))
    if args.images is not None:
        from lit_grpo.commands.expand_photos import find_annotations

        notes = find_annotations(args, out)
        samples = []
        for note in notes:  # the photos' paths, relative to the output's folder from now on
            for key in ("image", "mask"):
                note[key] = os.path.relpath(note[key], out.parent.resolve())
            rng = np.random.default_rng([args.seed, note.pop("key")])
            samples += expand_annotation(note, tasks, rng)
        return _write(samples, out, tasks)

    from lit_grpo.datamodules.jsonl_rows import ImageProbe

    samples, bad, lines = [], [], 0
    probe = ImageProbe(check_pixels=False)
    with open(src, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            lines += 1
            note, problem = _read(raw, src.parent, probe)
            if problem:
                bad.append(f"{src}:{n}: {problem}")
                continue
            for key in ("image", "mask"):  # relative to the output's folder from now on
                if note.get(key):
                    path = (src.parent / note[key]).resolve()
                    note[key] = os.path.relpath(path, out.parent.resolve())
            rng = np.random.default_rng([args.seed, n])
            samples += expand_annotation(note, tasks, rng)
    if not lines:
        raise ConfigError(f"{src} holds no annotation line: nothing to expand")
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED])
        if len(bad) > MAX_LISTED:
            listed += f"\n  ... and {len(bad) - MAX_LISTED} more"
        if not samples:
            raise ConfigError(
                f"no good annotation line in {src} ({len(bad)} bad):\n  {listed}\nnothing written"
            )
        if args.on_bad_row == "error":
            raise ConfigError(
                f"{len(bad)} of {lines} annotation lines of {src} are bad:\n  {listed}\nFix "
                "them, or pass --on-bad-row skip to leave them out (nothing written)"
            )
        print(f"skipped {len(bad)} bad annotation line(s):\n  {listed}", file=sys.stderr)
    return _write(samples, out, tasks)


def _write(samples: list[dict], out, tasks: list[str]) -> int:
    import json

    with open(out, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    kept = len(samples) // (4 * len(tasks))
    print(f"wrote {len(samples)} samples ({kept} annotations x {len(tasks)} task(s) x 4) to {out}")
    return 0


def _read(raw: bytes, folder, probe) -> tuple[dict | None, str | None]:
    """(the annotation, None), or (None, all that is wrong with the line). Images and masks
    must exist and be images (PIL's `verify`: the header and structure, cheap; the pixels
    are decoded when `JsonlDataModule` reads the samples), a mask the image's size, a box 4
    numbers inside the image."""
    import json

    from lit_grpo.datamodules.jsonl_rows import check_box

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1})"
    try:
        note = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(note, dict):
        return None, "expected a JSON object with image and object"
    missing = [
        k for k in ("image", "object") if not isinstance(note.get(k), str) or not note[k].strip()
    ]
    if missing:
        return None, f"needs non-empty string(s) {', '.join(map(repr, missing))}"
    problems = []
    if note.get("mask") is not None and not isinstance(note["mask"], str):
        problems.append(f"'mask' must be a path, got {note['mask']!r}")
    size = probe(folder / note["image"], "image", problems)
    if isinstance(note.get("mask"), str):
        mask_size = probe(folder / note["mask"], "mask", problems)
        if size and mask_size and mask_size != size:
            problems.append(
                f"mask {folder / note['mask']} is {mask_size[0]}x{mask_size[1]} px, the image "
                f"{size[0]}x{size[1]} px"
            )
    if note.get("box") is not None and size is not None:
        check_box(note["box"], size, problems)
    return (None, "; ".join(problems)) if problems else (note, None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
