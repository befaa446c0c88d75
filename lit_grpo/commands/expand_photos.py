"""`expand --images DIR --objects ...`: annotations found by the segmenter, for photos without.

Each named object is looked for in each photo of the folder with `SamClipSegmenter.locate`
(SAM run once per photo, every name scored by open_clip). A found object's mask is written as
a PNG at the photo's size and, with its box, makes the `(image, object, box, mask)`
annotation that `expand` turns into samples. An object not found is skipped: named on stderr
with its best CLIP score, and counted. Files of the folder that are not images are refused
(or, with `--on-bad-row skip`, left out) before the models are loaded.

SAM sees at most its encoder's input size (1024 px for the released models): a larger photo
is segmented at that size, and the mask brought back to the photo's size (nearest), which
loses nothing SAM would have seen (its masks come from 256 x 256 logits).
"""

from __future__ import annotations

import sys
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from lit_grpo.checks import ConfigError, ensure_writable_dir
from lit_grpo.datamodules.jsonl_rows import MAX_LISTED, ImageProbe


def find_annotations(args: Namespace, out: Path) -> list[dict]:
    """The annotations `{image, object, box, mask, key}` (absolute paths; `key` seeds the
    sample's phrasing: the same photo and object give the same samples whatever else the
    folder holds) of the objects found in `args.images`."""
    from PIL import Image

    folder = Path(args.images).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a folder; pass a folder of photos")
    names = list(dict.fromkeys(n.strip() for n in args.objects.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"--objects {args.objects!r} names no object; e.g. --objects 'cup,dog'")
    photos = _photos(folder, args.on_bad_row)
    masks = Path(args.masks).expanduser() if args.masks else out.parent / f"{out.stem}_masks"
    if masks.is_dir() and any(masks.iterdir()) and not args.force:
        raise ConfigError(f"{masks} (--masks) is not empty; pass --force to write over it")

    from lit_grpo.perception import SamClipSegmenter

    seg = SamClipSegmenter(
        args.sam,
        args.clip,
        sam_model=args.sam_model,
        clip_model=args.clip_model,
        threshold=args.threshold,
    )
    created = not masks.exists()  # made once the models load; removed if nothing is found
    ensure_writable_dir(masks, "mask folder (--masks)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    side = seg.sam.image_encoder.img_size  # what SAM's encoder sees of any image
    notes, missed = [], []
    for photo in photos:
        with Image.open(photo) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        scale = min(1.0, side / max(w, h))
        small = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        det, best = seg.locate(pixels.to(device), names)
        for j, name in enumerate(names):
            if not det.found[j]:
                why = (
                    "SAM proposed no mask"
                    if best[j].isnan()
                    else f"best CLIP score {best[j]:.3f} < --threshold {args.threshold}"
                )
                missed.append(f"{photo}: {name!r} not found ({why})")
                continue
            mask = Image.fromarray(det.mask[j].cpu().numpy().astype(np.uint8) * 255)
            mask = mask.resize((w, h), Image.NEAREST)
            path = masks / f"{photo.name}.{j}.png"
            mask.save(path)
            ys, xs = np.nonzero(np.asarray(mask))
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            key = zlib.crc32(f"{photo.name}\0{name}".encode())
            notes.append(
                {
                    "image": str(photo.resolve()),
                    "object": name,
                    "box": box,
                    "mask": str(path.resolve()),
                    "key": key,
                }
            )
    asked = len(photos) * len(names)
    if not notes:
        if created:  # nothing written means no empty folder left behind either
            masks.rmdir()
        raise ConfigError(
            f"found none of {names} in the {len(photos)} photo(s) of {folder}:\n  "
            + _listed(missed)
            + "\nnothing written (a lower --threshold finds more, less surely)"
        )
    if missed:
        print(
            f"found {len(notes)} of {asked} (photo, object) pairs; skipped {len(missed)} not "
            f"found:\n  {_listed(missed)}",
            file=sys.stderr,
        )
    return notes


def _photos(folder: Path, on_bad_row: str) -> list[Path]:
    """The folder's image files, sorted (hidden files and subfolders are not looked at);
    non-images stop the command (on_bad_row "error") or are named and left out ("skip")."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"--images {folder} holds no file: nothing to expand")
    probe, bad = ImageProbe(check_pixels=True), []
    photos = [f for f in files if probe(f, "file", bad) is not None]
    if not photos:
        raise ConfigError(f"no image in {folder} ({len(bad)} other file(s)):\n  {_listed(bad)}")
    if bad and on_bad_row == "error":
        raise ConfigError(
            f"{len(bad)} of {len(files)} files of {folder} are not images:\n  {_listed(bad)}\n"
            "Remove them, or pass --on-bad-row skip to leave them out (nothing written)"
        )
    if bad:
        print(f"skipped {len(bad)} file(s) that are not images:\n  {_listed(bad)}", file=sys.stderr)
    return photos


def _listed(lines: list[str]) -> str:
    listed = "\n  ".join(lines[:MAX_LISTED])
    if len(lines) > MAX_LISTED:
        listed += f"\n  ... and {len(lines) - MAX_LISTED} more"
    return listed
