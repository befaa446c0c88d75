"""SamClipSegmenter on photo-like images with a tiny random SAM and open_clip (CPU): seconds
per image for finding one named object and for `objects()`, and how many of SAM's
proposals each scene rule (`lit_grpo.perception.scene`) leaves.

    python benchmarks/scene_segmenter.py --images 8 --size 64 256

A random SAM rates nothing highly and its masks have no edges worth the name, so the rules
are run here at loose quality thresholds (any predicted IoU and stability) and the counts
say what the size and one-per-object rules drop of such masks, not how good the defaults
are on real ones: the quality defaults are SAM's automatic mask generator's (docs/data.md).
The seconds are the pipeline's own (prompt grid, mask decoding at full size, filters, crops
and CLIP) around a 79k-parameter encoder: a real SAM's encoder adds its own time.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout; the tests' tiny models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="photos per size")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 256], help="photo sides")
    parser.add_argument("--points-per-side", type=int, default=16)
    args = parser.parse_args(argv)

    from helpers import tiny_clip_scorer, tiny_sam, toy_photo

    from lit_grpo.perception import SamClipSegmenter
    from lit_grpo.perception.scene import distinct_objects, sides_touched

    torch.set_grad_enabled(False)
    loose = {"min_quality": -10.0, "scene_quality": -10.0, "scene_stability": 0.0}
    seg = SamClipSegmenter.from_models(
        tiny_sam(), tiny_clip_scorer(), points_per_side=args.points_per_side, **loose
    )
    print(f"points_per_side {args.points_per_side} ({3 * args.points_per_side**2} masks)")
    print(
        "side | s/image find | s/image objects | proposals | <= 0.5 of area | and <= 2 sides | kept"
    )
    for side in args.size:
        photos = [toy_photo(side, side, seed) for seed in range(args.images)]
        seg(photos[0][None], ["cup"])  # warm-up
        start = time.perf_counter()
        for photo in photos:
            seg(photo[None], ["cup"])
        find = (time.perf_counter() - start) / len(photos)
        start = time.perf_counter()
        for photo in photos:
            seg.objects(photo[None])
        objects = (time.perf_counter() - start) / len(photos)
        counts = torch.zeros(4)
        for photo in photos:
            masks, _ = seg.propose(photo, max_area=1.0)
            area = masks.flatten(1).float().mean(1)
            small = area <= seg.scene_max_area
            sides = small & (sides_touched(masks) <= seg.scene_max_sides)
            kept = distinct_objects(masks, seg.scene_max_area, seg.scene_max_sides, 0.9)
            counts += torch.tensor([len(masks), small.sum(), sides.sum(), len(kept)])
        c = (counts / len(photos)).tolist()
        print(
            f"{side} | {find:.3f} | {objects:.3f} | {c[0]:.1f} | {c[1]:.1f} | {c[2]:.1f} | "
            f"{c[3]:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
