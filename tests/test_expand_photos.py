"""`expand --images DIR --objects ...`: annotations found by SamClipSegmenter (a tiny random
SAM and open_clip from local files) in photos the test writes."""

import json

import numpy as np
import pytest
import torch
from helpers import save_tiny_clip, tiny_sam, toy_photo
from PIL import Image
from test_jsonl_data import save_png
from test_user_errors import error_of

from lit_grpo.__main__ import main
from lit_grpo.datamodules.jsonl import JsonlEditDataset
from lit_grpo.perception import SamClipSegmenter

NAMES = ["cup", "red dog"]


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """(sam .pth, clip weights, clip config): a tiny SAM stands in for vit_b (FACTS.md)."""
    import segment_anything

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", tiny_sam)
    torch.save(tiny_sam().state_dict(), tmp_path / "sam.pth")
    config, clip, _ = save_tiny_clip(tmp_path, seed=1)
    return str(tmp_path / "sam.pth"), clip, config


def photos(folder):
    """A 40x48 PNG (SAM's 64 px input holds it whole) and a 96x80 JPEG (segmented at 64x53)."""
    save_png(folder / "a.png", toy_photo(40, 48, 0))
    folder.joinpath("b.jpg").parent.mkdir(exist_ok=True)
    image = (toy_photo(80, 96, 3) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(image).save(folder / "b.jpg", quality=95)
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: not looked at


def args(folder, out, weights, *more):
    sam, clip, config = weights
    found = ["--images", str(folder), "--objects", ", ".join(NAMES), "--sam", sam]
    return ["expand", *found, "--clip", clip, "--clip-model", config, "--out", str(out), *more]


def pixels(path, side=64):
    """The photo as the command hands it to SAM: at most `side` px, bicubic."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(1.0, side / max(w, h))
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)


def test_expand_finds_the_objects_of_a_folder_of_photos(tmp_path, weights, capsys):
    folder, out = tmp_path / "photos", tmp_path / "data" / "train.jsonl"
    photos(folder)
    sam, clip, config = weights
    seg = SamClipSegmenter(sam, clip, clip_model=config, threshold=-1.0)
    found = {p: seg.locate(pixels(folder / p), NAMES) for p in ("a.png", "b.jpg")}
    best = {(p, n): found[p][1][j].item() for p in found for j, n in enumerate(NAMES)}
    # a threshold between the scores: some (photo, object) pairs found, the others not
    ranked = sorted(best.values())
    threshold = (ranked[1] + ranked[2]) / 2
    kept = sorted(k for k, v in best.items() if v >= threshold)
    missed = sorted(k for k, v in best.items() if v < threshold)
    assert len(kept) == 2 and len(missed) == 2

    assert (
        main(args(folder, out, weights, "--threshold", str(threshold), "--tasks", "translate")) == 0
    )
    std = capsys.readouterr()
    assert f"wrote 8 samples (2 annotations x 1 task(s) x 4) to {out}" in std.out
    assert "found 2 of 4 (photo, object) pairs; skipped 2 not found:" in std.err
    for p, name in missed:  # each skip named with its score
        score = best[p, name]
        assert (
            f"{folder / p}: {name!r} not found (best CLIP score {score:.3f} < --threshold"
            in std.err
        )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted({(r["image"].split("/")[-1], r["object"]) for r in rows}) == kept
    for row in rows:
        photo = row["image"].split("/")[-1]
        assert row["image"] == f"../photos/{photo}" and row["task"] == "translate"
        j = NAMES.index(row["object"])
        assert row["mask"] == f"train_masks/{photo}.{j}.png"
        mask = np.asarray(Image.open(out.parent / row["mask"])) > 0
        with Image.open(folder / photo) as im:
            assert mask.shape == (im.height, im.width)  # the photo's size, not SAM's
        small = found[photo][0].mask[j].numpy()
        if photo == "a.png":  # segmented at its own size: the segmenter's mask itself
            assert np.array_equal(mask, small)
        else:  # 64x53 -> 96x80, nearest
            scaled = Image.fromarray(small.astype(np.uint8)).resize((96, 80), Image.NEAREST)
            assert np.array_equal(mask, np.asarray(scaled) > 0)
        ys, xs = np.nonzero(mask)
        assert row["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert len(rows) == 8 and sorted(
        p.name for p in (out.parent / "train_masks").iterdir()
    ) == sorted(f"{p}.{NAMES.index(n)}.png" for p, n in kept)
    data = JsonlEditDataset(out, 16)  # every sample is a good row whose paths resolve
    assert len(data) == 8 and all("mask_before" in data[i] for i in range(8))
    # the same photos and seed give the same file; a photo added changes no other row
    first = out.read_text()
    run = args(folder, out, weights, "--threshold", str(threshold), "--tasks", "translate")
    assert main(run) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*run, "--force"]) == 0 and out.read_text() == first
    save_png(folder / "c.png", toy_photo(40, 48, 5))
    assert main([*run, "--force", "--threshold", "-1"]) == 0
    capsys.readouterr()
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(again) == 6 * 4
    assert [r for r in again if (r["image"].split("/")[-1], r["object"]) in kept] == rows


def test_expand_photos_refuses_what_it_cannot_use(tmp_path, weights, capsys):
    out = tmp_path / "train.jsonl"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("x")
    assert error_of(capsys, *args(empty, out, weights)) == (
        f"lit_grpo expand: error: --images {empty} holds no file: nothing to expand"
    )
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("a cup, a dog\n")
    assert error_of(capsys, *args(text, out, weights)) == (
        f"lit_grpo expand: error: no image in {text} (1 other file(s)):"
    )
    mixed = tmp_path / "mixed"
    photos(mixed)
    (mixed / "notes.txt").write_text("a cup, a dog\n")
    assert main(args(mixed, out, weights)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"lit_grpo expand: error: 1 of 3 files of {mixed} are not images:"
    assert err[1].startswith(f"  file {mixed / 'notes.txt'} is not a readable image (")
    assert not out.exists() and not (tmp_path / "train_masks").exists()
    # skipped on request; nothing found at all is an error, and nothing is left behind
    assert main([*args(mixed, out, weights, "--on-bad-row", "skip"), "--threshold", "2"]) == 2
    err = capsys.readouterr().err
    assert "skipped 1 file(s) that are not images" in err
    assert f"error: found none of {NAMES} in the 2 photo(s) of {mixed}:" in err
    assert err.count("not found (best CLIP score") == 4 and "nothing written" in err
    assert not out.exists() and not (tmp_path / "train_masks").exists()
    assert error_of(capsys, *args(tmp_path / "nowhere", out, weights)).startswith(
        f"lit_grpo expand: error: --images {tmp_path / 'nowhere'} is not a folder"
    )
    sam, clip, config = weights
    missing = ["expand", "--images", str(mixed), "--objects", "cup", "--sam", "no.pth"]
    missing += ["--clip", clip, "--clip-model", config, "--out", str(out), "--on-bad-row", "skip"]
    assert "sam_checkpoint: " in error_of(capsys, *missing)
    # the models' options go with --images only, and --images needs them
    with pytest.raises(SystemExit):
        main(["expand", "--images", str(mixed), "--objects", "cup", "--out", str(out)])
    assert "--images needs --sam, --clip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["expand", "--annotations", str(out), "--objects", "cup", "--out", str(out)])
    assert "--objects: only with --images" in capsys.readouterr().err
