"""`python -m lit_grpo expand`: (image, object) annotations -> template edit samples (jsonl).

Talk2Move trains its RL stage on single-sided samples: an image and a template instruction,
no target (800 translation images became 3,200 samples). Each annotation line here,
`{"image": ..., "object": ..., "box"?: ..., "mask"?: ...}`, becomes 4 samples per task:
the 4 directions, 4 rotation angles (45, 90, 135, 180 degrees, the sense drawn), 4 scale
factors (0.5, 0.75, 1.5, 2) (`lit_grpo.datamodules.instructions`). The output rows are
`JsonlDataModule` rows; their paths are rewritten relative to the output file's folder.
"""

import argparse
import sys

HELP = "expand (image, object) annotations into template edit samples (a jsonl for training)"

EPILOG = """\
an annotation line: {"image": "imgs/0001.jpg", "object": "mug", "box": [12, 40, 96, 130]}
  (paths relative to the annotation file's folder; other keys are carried into the samples)
each annotation gives 4 samples per task, phrased by ShapeWorld's templates:
  translate  left, right, up, down             "move the mug to the left"
  rotate     45, 90, 135, 180 deg, sense drawn  "rotate the mug 90 degrees clockwise"
  scale      x0.5, x0.75, x1.5, x2              "make the mug twice as big"
the phrasings and senses are drawn from (--seed, line number): the same input and seed give
the same file, and adding lines changes no other line's samples.

example:
  python -m lit_grpo expand --annotations data/objects.jsonl --out data/train.jsonl
  python -m lit_grpo expand --annotations a.jsonl --out rot.jsonl --tasks rotate --seed 3
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_grpo expand",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--annotations", required=True, help="jsonl of (image, object) lines")
    parser.add_argument("--out", required=True, help="the samples jsonl to write")
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
        help="a bad annotation line stops the command (error, default) or is left out (skip)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)

    import json
    import os
    from pathlib import Path

    import numpy as np

    from lit_grpo.checks import ConfigError, ensure_file, ensure_writable_dir
    from lit_grpo.datamodules.instructions import expand_annotation

    src = ensure_file(args.annotations, "annotation file (--annotations)", "Pass a jsonl file.")
    out = Path(args.out).expanduser()
    if out.resolve() == src.resolve():
        parser.error("--out must not be the annotation file")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    ensure_writable_dir(out.parent, "output directory (--out)")
    tasks = list(dict.fromkeys(args.tasks))

    samples, bad = [], []
    with open(src, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                note = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(f"{src}:{n}: not valid JSON ({err.msg} at column {err.colno})")
                continue
            problem = _check(note, src.parent)
            if problem:
                bad.append(f"{src}:{n}: {problem}")
                continue
            for key in ("image", "mask"):  # relative to the output's folder from now on
                if note.get(key):
                    path = (src.parent / note[key]).resolve()
                    note[key] = os.path.relpath(path, out.parent.resolve())
            rng = np.random.default_rng([args.seed, n])
            samples += expand_annotation(note, tasks, rng)
    if bad:
        listed = "\n  ".join(bad[:50]) + (
            f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        )
        if args.on_bad_row == "error":
            raise ConfigError(
                f"{len(bad)} bad annotation line(s):\n  {listed}\nFix them, or pass "
                "--on-bad-row skip to leave them out"
            )
        print(f"skipped {len(bad)} bad annotation line(s):\n  {listed}", file=sys.stderr)
    with open(out, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    kept = len(samples) // (4 * len(tasks)) if samples else 0
    print(f"wrote {len(samples)} samples ({kept} annotations x {len(tasks)} task(s) x 4) to {out}")
    return 0


def _check(note, folder) -> str | None:
    """What is wrong with an annotation line, or None. Images are checked to exist (not
    decoded: `JsonlDataModule` checks each file when it reads the samples)."""
    if not isinstance(note, dict):
        return "expected a JSON object with image and object"
    missing = [
        k for k in ("image", "object") if not isinstance(note.get(k), str) or not note[k].strip()
    ]
    if missing:
        return f"needs non-empty string(s) {', '.join(map(repr, missing))}"
    for key in ("image", "mask"):
        if note.get(key) is not None and not (folder / str(note[key])).is_file():
            return f"{key} not found: {folder / str(note[key])}"
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
