"""The real-image data path on CPU: rows per second for the up-front jsonl checks and for
decoding rows into batches (issue 24).

    python benchmarks/real_data.py --photos 64 --side 640 --resolution 256 1024

Writes `--photos` JPEG photos (`tests/helpers.toy_photo`, `--side` px wide, 4:3) with a PNG
mask each, and a jsonl of 4 rows a photo (the four directions, as `expand` writes them),
then times, on one thread:

- `checks, pixels`: `JsonlEditDataset` set-up with `check_pixels=True` (the default: every
  distinct image and mask file decoded once up front, which catches truncated JPEGs);
- `checks, headers`: the same with `check_pixels=False` (headers and PNG checksums only);
- `decode @ R`: every row read back as the training loop gets it (`dataset[i]`: the source
  and mask decoded and resized to R, the instruction parsed), then collated in batches of 8.

Rows per second are over all rows (4 share a photo: the checks decode each file once).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout; the tests' photo maker


def write_rows(folder: Path, photos: int, side: int) -> Path:
    """`photos` JPEGs with a mask each and their 4 rows; the jsonl's path."""
    from helpers import toy_photo
    from PIL import Image

    (folder / "photos").mkdir()
    height = side * 3 // 4
    rows = []
    for k in range(photos):
        image = (toy_photo(height, side, k) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(image).save(folder / "photos" / f"{k}.jpg", quality=90)
        mask = torch.zeros(height, side, dtype=torch.uint8)
        mask[height // 3 : height // 2, side // 3 : side // 2] = 255
        Image.fromarray(mask.numpy()).save(folder / "photos" / f"{k}.png")
        for direction in ("left", "right", "up", "down"):
            rows.append(
                {
                    "image": f"photos/{k}.jpg",
                    "instruction": f"move the block to the {direction}",
                    "task": "translate",
                    "object": "block",
                    "mask": f"photos/{k}.png",
                }
            )
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=64, help="photos (4 rows each)")
    parser.add_argument("--side", type=int, default=640, help="photo width in px (4:3)")
    parser.add_argument(
        "--resolution", type=int, nargs="+", default=[256, 1024], help="decode sizes"
    )
    args = parser.parse_args(argv)

    from lit_grpo.datamodules.jsonl import JsonlEditDataset, collate_rows

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(Path(tmp), args.photos, args.side)
        n = 4 * args.photos
        for label, pixels in (("checks, pixels", True), ("checks, headers", False)):
            start = time.perf_counter()
            JsonlEditDataset(path, args.resolution[0], check_pixels=pixels)
            results.append((label, n, time.perf_counter() - start))
        for side in args.resolution:
            dataset = JsonlEditDataset(path, side, check_pixels=False)
            start = time.perf_counter()
            rows = [dataset[i] for i in range(len(dataset))]
            for i in range(0, n, 8):
                collate_rows(rows[i : i + 8])
            results.append((f"decode @ {side}", n, time.perf_counter() - start))
    print(
        f"\n{args.photos} JPEG photos {args.side} x {args.side * 3 // 4} px with a PNG mask "
        f"each, {4 * args.photos} rows; one thread\n"
    )
    print("| step | rows | seconds | rows / s |")
    print("| --- | --- | --- | --- |")
    for label, rows_, seconds in results:
        print(f"| {label} | {rows_} | {seconds:.2f} | {rows_ / seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
