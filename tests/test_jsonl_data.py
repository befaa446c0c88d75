"""The jsonl data module of real images, the instruction parser, the `expand` command.

The fixture datasets are ShapeWorld renders written as PNG files with jsonl rows: the
ground truth (edit fields, masks, boxes) is then known exactly."""

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_grpo.checks import ConfigError
from lit_grpo.datamodules import JsonlDataModule
from lit_grpo.datamodules.instructions import (
    InstructionError,
    edit_levels,
    expand_annotation,
    parse_instruction,
)
from lit_grpo.datamodules.jsonl import JsonlEditDataset, collate_rows
from lit_grpo.datamodules.shapeworld import DIRECTIONS, ShapeWorld

ROOT = Path(__file__).resolve().parent.parent


def save_png(path: Path, image: torch.Tensor) -> None:
    """[3, H, W] in [0, 1] or [H, W] bool -> an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 2:
        Image.fromarray(image.numpy().astype(np.uint8) * 255).save(path)
    else:
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


def shapeworld_rows(folder: Path, n: int, tasks=("translate", "rotate", "scale"), full=True):
    """n ShapeWorld samples as PNGs under folder/imgs and their rows (target, mask and box
    when `full`); returns (samples, rows)."""
    data = ShapeWorld("train", n, 16, tuple(tasks), seed=5)
    samples, rows = [data[i] for i in range(n)], []
    for i, s in enumerate(samples):
        save_png(folder / f"imgs/{i}.png", s["source"])
        row = {"image": f"imgs/{i}.png", **{k: s[k] for k in ("instruction", "task", "object")}}
        if full:
            save_png(folder / f"imgs/{i}_target.png", s["target"])
            save_png(folder / f"masks/{i}.png", s["mask_before"])
            row |= {"target": f"imgs/{i}_target.png", "mask": f"masks/{i}.png"}
            row["box"] = s["box_before"].tolist()
        rows.append(row)
    return samples, rows


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def quantised(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round() / 255


# --- the instruction parser -----------------------------------------------------------------------


def test_every_shapeworld_instruction_parses_back_to_its_edit():
    data = ShapeWorld("train", 600, 16, seed=2)
    for i in range(len(data)):
        scene, edit, text = data.scene(i)
        obj = scene.shapes[edit.target]
        got = parse_instruction(text, edit.task, f"{obj.colour} {obj.kind}")
        direction = DIRECTIONS[edit.direction] if edit.task == "translate" else (0.0, 0.0)
        assert (got.direction, got.angle, got.factor) == (direction, edit.angle, edit.factor), text


@pytest.mark.parametrize(
    "text, task, obj, field, value",
    [
        ("Move the mug to the LEFT", "translate", "mug", "direction", (-1.0, 0.0)),
        ("move the left cup right", "translate", "left cup", "direction", (1.0, 0.0)),
        ("rotate the 2 cats 90° anti-clockwise", "rotate", "2 cats", "angle", 90.0),
        ("turn the dog by 30 degrees clockwise", "rotate", "dog", "angle", -30.0),
        ("make the dog twice as big", "scale", "dog", "factor", 2.0),
        ("shrink the vase to a quarter of its size", "scale", "vase", "factor", 0.25),
        ("scale the tree by 1.25", "scale", "tree", "factor", 1.25),
    ],
)
def test_plain_free_text_parses(text, task, obj, field, value):
    assert getattr(parse_instruction(text, task, obj), field) == value


@pytest.mark.parametrize(
    "text, task, error",
    [
        ("move the mug somewhere", "translate", "no direction"),
        ("move the mug up and left", "translate", "several directions"),
        ("rotate the mug 90 degrees", "rotate", "no sense"),
        ("rotate the mug clockwise", "rotate", "no angle"),
        ("make the mug 0.5 times bigger", "scale", "contradict"),
        ("enlarge the mug by 50%", "scale", "percentage is ambiguous"),
        ("make the mug 1 times bigger", "scale", "changes nothing"),
        ("scale the mug by 2 or 3", "scale", "several factors"),
    ],
)
def test_unreadable_instructions_say_what_is_missing(text, task, error):
    with pytest.raises(InstructionError, match=error):
        parse_instruction(text, task, "mug")


def test_expansion_gives_the_levels_and_is_seeded():
    note = {"image": "a.png", "object": "mug", "box": [1, 2, 3, 4], "task": "x", "target": "t"}
    rows = list(expand_annotation(note, ["translate", "rotate", "scale"], np.random.default_rng(0)))
    assert len(rows) == 12 and all(r["box"] == [1, 2, 3, 4] and "target" not in r for r in rows)
    specs = [parse_instruction(r["instruction"], r["task"], "mug") for r in rows]
    assert [s.direction for s in specs[:4]] == list(DIRECTIONS.values())
    assert sorted(abs(s.angle) for s in specs[4:8]) == [45, 90, 135, 180]
    assert [s.factor for s in specs[8:]] == [0.5, 0.75, 1.5, 2.0]
    again = list(
        expand_annotation(note, ["translate", "rotate", "scale"], np.random.default_rng(0))
    )
    assert again == rows
    senses = {
        tuple(e.angle for e in edit_levels("rotate", np.random.default_rng(s))) for s in range(8)
    }
    assert len(senses) > 1  # the sense of each level is drawn


# --- rows, bad rows, batches ----------------------------------------------------------------------


def test_rows_become_shapeworlds_batch_fields(tmp_path):
    samples, rows = shapeworld_rows(tmp_path, 6)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = JsonlEditDataset(path, 16)
    assert len(data) == 6
    for i, s in enumerate(samples):
        got = data[i]
        assert torch.equal(got["source"], quantised(s["source"]))
        assert torch.equal(got["target"], quantised(s["target"]))
        assert torch.equal(got["mask_before"], s["mask_before"])
        assert torch.equal(got["box_before"], s["box_before"])
        for key in ("instruction", "object", "task"):
            assert got[key] == s[key]
        for key in ("direction", "angle", "factor"):
            assert torch.equal(got[key], s[key]), key
        assert got["origin"] == f"{path}:{i + 1}" and got["index"] == i
    bigger = JsonlEditDataset(path, (32, 48))[0]  # stretched: the box scales with it
    assert bigger["source"].shape == (3, 32, 48) and bigger["mask_before"].shape == (32, 48)
    assert torch.equal(bigger["box_before"], samples[0]["box_before"] * torch.tensor([3, 2, 3, 2]))


def bad_file(tmp_path: Path) -> tuple[Path, list]:
    _, rows = shapeworld_rows(tmp_path, 3)
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    whole = (tmp_path / "imgs/0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    save_png(tmp_path / "small_mask.png", torch.zeros(8, 8, dtype=torch.bool))
    lines = [
        rows[0],  # 1 good
        '{"image": "imgs/1.png", "task": ',  # 2
        {k: v for k, v in rows[1].items() if k != "task"},  # 3
        "",  # 4 blank: skipped, not bad
        rows[1] | {"image": "imgs/nope.png"},  # 5
        rows[1] | {"image": "garbage.png"},  # 6
        rows[1] | {"task": "spin"},  # 7
        rows[1] | {"box": [0, 0, 99, 5]},  # 8
        rows[1] | {"task": "translate", "instruction": "move it somewhere nice"},  # 9
        rows[1] | {"target": "cut.png"},  # 10
        rows[2],  # 11 good
        "[1, 2]",  # 12
        rows[1] | {"mask": "small_mask.png"},  # 13
    ]
    return write_jsonl(tmp_path / "rows.jsonl", lines), lines


EXPECTED = {
    2: "not valid JSON",
    3: "missing key 'task'",
    5: "image not found: ",
    6: "garbage.png is not a readable image",
    7: "unknown task 'spin' (expected translate, rotate, scale)",
    8: "box [0, 0, 99, 5] must satisfy 0 <= x0 < x1 <= 16",
    9: "does not read as a translate edit: no direction",
    10: "target ",
    12: "expected a JSON object",
    13: "is 8x8 px, the image 16x16 px",
}


def test_bad_rows_stop_with_every_file_and_line(tmp_path):
    path, _ = bad_file(tmp_path)
    with pytest.raises(ConfigError) as err:
        JsonlEditDataset(path, 16)
    message = str(err.value)
    assert message.startswith(f"10 of 12 rows of {path} are bad")
    listed = [x.strip() for x in message.splitlines() if x.strip().startswith(f"{path}:")]
    reported = {int(x[len(f"{path}:") :].split(":")[0]) for x in listed}
    assert reported == set(EXPECTED)
    for n, fragment in EXPECTED.items():
        line = next(x for x in message.splitlines() if x.strip().startswith(f"{path}:{n}: "))
        assert fragment in line, line
    assert "cut.png is not a readable image" in message  # the truncated PNG (line 10)
    assert "on_bad_row: skip" in message


def test_a_truncated_jpeg_is_caught_by_decoding_it(tmp_path):
    _, rows = shapeworld_rows(tmp_path, 1, full=False)
    buffer = tmp_path / "whole.jpg"
    Image.open(tmp_path / "imgs/0.png").resize((256, 256)).save(buffer, quality=95)
    whole = buffer.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    path = write_jsonl(tmp_path / "j.jsonl", [rows[0] | {"image": "cut.jpg"}, rows[0]])
    with pytest.raises(ConfigError, match=r"j.jsonl:1: image .*cut.jpg is not a readable image"):
        JsonlEditDataset(path, 16)
    fast = JsonlEditDataset(path, 16, check_pixels=False)  # headers only: it slips through
    assert len(fast) == 2
    with pytest.raises(OSError, match=f"{path}:1: cannot read"):
        fast[0]


def test_skip_warns_with_the_lines_and_keeps_the_good_rows(tmp_path):
    path, _ = bad_file(tmp_path)
    with pytest.warns(UserWarning, match="skipping 10 of 12 rows") as caught:
        data = JsonlEditDataset(path, 16, on_bad_row="skip")
    text = str(caught[0].message)
    assert all(f"{path}:{n}: " in text for n in EXPECTED)
    assert [data[i]["origin"] for i in range(len(data))] == [f"{path}:1", f"{path}:11"]
    extra = write_jsonl(
        tmp_path / "extra.jsonl", [json.loads(path.read_text().splitlines()[0]) | {"note": 1}]
    )
    with pytest.warns(UserWarning, match=r"ignoring unknown key\(s\) \['note'\]"):
        JsonlEditDataset(extra, 16)


def test_a_batch_without_some_targets_names_the_rows_and_sft_refuses_it(tmp_path):
    from lit_grpo.modules import SFTModule
    from lit_grpo.policies import TinyEditPolicy

    _, rows = shapeworld_rows(tmp_path, 3)
    del rows[1]["target"]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    data = JsonlEditDataset(path, 16)
    batch = collate_rows([data[i] for i in range(3)])
    assert "target" not in batch and batch["missing"] == {"target": [f"{path}:2"]}
    assert batch["source"].shape == (3, 3, 16, 16) and batch["origin"][2] == f"{path}:3"
    sft = SFTModule(TinyEditPolicy(width=32, depth=1, heads=2))
    with pytest.raises(ValueError, match=f"rows without one: {path}:2"):
        sft.flow_matching_loss(batch)
    # up front: an SFT stage makes such a row a bad row of the data module
    dm = JsonlDataModule(train=str(path), resolution=16)
    dm.trainer = SimpleNamespace(lightning_module=sft)
    with pytest.raises(ConfigError, match=f"{path}:2: no 'target' image"):
        dm.setup("fit")


def test_resolution_is_bound_late_from_the_policy_and_checked(tmp_path):
    _, rows = shapeworld_rows(tmp_path, 2, full=False)
    path = str(write_jsonl(tmp_path / "r.jsonl", rows))
    with pytest.raises(FileNotFoundError, match="data.init_args.val: jsonl file not found"):
        JsonlDataModule(train=path, val=str(tmp_path / "gone.jsonl"))
    dm = JsonlDataModule(train=path)
    with pytest.raises(ConfigError, match="set data.init_args.resolution"):
        dm.setup("fit")
    from lit_grpo.policies import TinyEditPolicy

    policy = TinyEditPolicy(width=32, depth=1, heads=2)
    policy.resolution = 24  # a policy that declares the size it takes
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(policy=policy))
    dm.setup("fit")
    assert dm.splits["train"][0]["source"].shape == (3, 24, 24) and dm.hparams.resolution == 24
    odd = JsonlDataModule(train=path, resolution=18)
    odd.trainer = dm.trainer
    with pytest.raises(ConfigError, match="multiple of the policy's token size 4x4"):
        odd.setup("fit")


def test_grpo_trains_on_jsonl_batches_unchanged(tmp_path):
    from helpers import tiny_module

    _, rows = shapeworld_rows(tmp_path, 4, tasks=("translate",), full=False)
    path = str(write_jsonl(tmp_path / "train.jsonl", rows))
    dm = JsonlDataModule(train=path, val=path, resolution=16, batch_size=2)
    module = tiny_module()  # the translation and background rewards
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=2,
    )
    trainer.fit(module, dm)
    changed = [
        n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert changed and len(changed) == len(before)
    metrics = trainer.callback_metrics
    # the edit metrics ran on batches without true masks (the segmenter's masks instead)
    assert {"val/translate/background_l1", "val/translate/found", "val/reward"} <= set(metrics)
    assert torch.isfinite(metrics["val/translate/background_l1"])


def test_sft_trains_on_rows_with_targets_and_no_val_split(tmp_path):
    from lit_grpo.modules import SFTModule
    from lit_grpo.policies import TinyEditPolicy

    _, rows = shapeworld_rows(tmp_path, 4)
    dm = JsonlDataModule(
        train=str(write_jsonl(tmp_path / "t.jsonl", rows)), resolution=16, batch_size=2
    )
    torch.manual_seed(0)
    module = SFTModule(TinyEditPolicy(width=32, depth=1, heads=2), warmup_steps=1, sample_steps=2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 2 and dm.val_dataloader() == []
    assert not torch.equal(
        module.policy.transformer.proj_out.weight, before["policy.transformer.proj_out.weight"]
    )


def test_fit_through_the_cli_reports_bad_rows_without_a_traceback(tmp_path, in_tmp, capsys):
    from lit_grpo.__main__ import main

    path, _ = bad_file(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs/talk2move.yaml")]
    args += ["--data=lit_grpo.datamodules.JsonlDataModule", f"--data.init_args.train={path}"]
    args += ["--data.init_args.resolution=16", "--trainer.max_steps=1", "--trainer.logger=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lit_grpo fit: error: 10 of 12 rows of" in err and "Traceback" not in err
    assert f"{path}:7: unknown task 'spin'" in err


def test_the_jsonl_overlay_parses(capsys):
    from lit_grpo.cli import run_cli

    configs = ["--config", str(ROOT / "configs/talk2move.yaml")]
    configs += ["--config", str(ROOT / "configs/data/jsonl.yaml")]
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", *configs, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    for name in ("JsonlDataModule", "SamClipSegmenter", "MaskAxisOrientation", "on_bad_row: skip"):
        assert name in printed


# --- the expand command ---------------------------------------------------------------------------


def test_expand_command_end_to_end(tmp_path, capsys):
    from lit_grpo.__main__ import main

    ann = tmp_path / "annotations"
    samples, rows = shapeworld_rows(ann, 2)
    notes = [
        {"image": r["image"], "object": r["object"], "box": r["box"], "id": i}
        for i, r in enumerate(rows)
    ]
    src = write_jsonl(ann / "objects.jsonl", notes)
    out = tmp_path / "data" / "samples.jsonl"
    assert main(["expand", "--annotations", str(src), "--out", str(out)]) == 0
    assert "wrote 24 samples (2 annotations x 3 task(s) x 4)" in capsys.readouterr().out
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written[0]["image"] == "../annotations/imgs/0.png" and written[0]["id"] == 0
    data = JsonlEditDataset(out, 16)  # every sample is a good row, its paths resolve
    assert len(data) == 24
    assert torch.equal(data[0]["source"], quantised(samples[0]["source"]))
    assert torch.equal(data[0]["box_before"], samples[0]["box_before"])
    factors = sorted(data[i]["factor"].item() for i in range(24) if data[i]["task"] == "scale")
    assert factors == [0.5, 0.5, 0.75, 0.75, 1.5, 1.5, 2.0, 2.0]
    # deterministic per seed; --force to overwrite
    first = out.read_text()
    assert main(["expand", "--annotations", str(src), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["expand", "--annotations", str(src), "--out", str(out), "--force"]) == 0
    assert out.read_text() == first
    main(["expand", "--annotations", str(src), "--out", str(out), "--force", "--seed", "1"])
    assert out.read_text() != first
    assert (
        main(
            ["expand", "--annotations", str(src), "--out", str(out), "--force", "--tasks", "rotate"]
        )
        == 0
    )
    assert {json.loads(x)["task"] for x in out.read_text().splitlines()} == {"rotate"}
    # a bad annotation is named by file and line
    bad = write_jsonl(
        ann / "bad.jsonl", [notes[0], {"image": "imgs/0.png"}, {"image": "no.png", "object": "x"}]
    )
    assert main(["expand", "--annotations", str(bad), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{bad}:2: needs non-empty string(s) 'object'" in err and f"{bad}:3: image not found" in err
    )
    assert (
        main(
            [
                "expand",
                "--annotations",
                str(bad),
                "--out",
                str(out),
                "--force",
                "--on-bad-row",
                "skip",
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 12


def test_expand_refuses_lines_that_would_damage_the_data(tmp_path, capsys):
    """Undecodable text, bad boxes, non-images and masks of another size are named by
    file:line (all at once), and nothing is written; so is an input with no line."""
    from test_user_errors import error_of

    from lit_grpo.__main__ import main

    _, rows = shapeworld_rows(tmp_path, 1)  # imgs/0.png, 16x16 px, and its mask
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    save_png(tmp_path / "small_mask.png", torch.ones(8, 8, dtype=torch.bool))
    good = {"image": "imgs/0.png", "object": "circle"}
    src = tmp_path / "objects.jsonl"
    src.write_bytes(
        b'{"image": "imgs/0.png", "object": "caf\xe9 mug"}\n'
        + "".join(
            json.dumps(good | extra) + "\n"
            for extra in (
                {"box": "abc"},
                {"box": [0, 0, 40, 8]},
                {"image": "passwd"},
                {"mask": "small_mask.png"},
                {},
            )
        ).encode()
    )
    out = tmp_path / "samples.jsonl"
    args = ["expand", "--annotations", str(src), "--out", str(out)]
    line = error_of(capsys, *args)
    assert line == f"lit_grpo expand: error: 5 of 6 annotation lines of {src} are bad:"
    assert not out.exists()
    main(args)
    listed = capsys.readouterr().err.splitlines()[1:]
    passwd = tmp_path / "passwd"
    assert listed == [
        f"  {src}:1: not UTF-8 text (byte 0xe9 at byte 39)",
        f"  {src}:2: box 'abc' must be 4 numbers [x0, y0, x1, y1] in pixels",
        f"  {src}:3: box [0, 0, 40, 8] must satisfy 0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16 "
        "(the image is 16x16 px; x1, y1 exclusive)",
        f"  {src}:4: image {passwd} is not a readable image (UnidentifiedImageError: cannot "
        f"identify image file '{passwd}')",
        f"  {src}:5: mask {tmp_path / 'small_mask.png'} is 8x8 px, the image 16x16 px",
        "Fix them, or pass --on-bad-row skip to leave them out (nothing written)",
    ]
    # skipped, the good line alone is written, its text intact
    assert main([*args, "--on-bad-row", "skip"]) == 0
    assert capsys.readouterr().err.splitlines()[1:] == listed[:-1]
    assert {json.loads(x)["object"] for x in out.read_text().splitlines()} == {"circle"}
    # more than 50 bad lines: the first 50 and a count
    many = write_jsonl(tmp_path / "many.jsonl", [good | {"box": [1, 2]}] * 53)
    main(["expand", "--annotations", str(many), "--out", str(out), "--force"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"lit_grpo expand: error: no good annotation line in {many} (53 bad):"
    assert err[50] == f"  {many}:50: box [1, 2] must be 4 numbers [x0, y0, x1, y1] in pixels"
    assert err[51:] == ["  ... and 3 more", "nothing written"]
    # an input with no annotation line
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        line = error_of(
            capsys,
            "expand",
            "--annotations",
            str(tmp_path / "empty.jsonl"),
            "--out",
            str(out),
            "--force",
        )
        assert line == (
            f"lit_grpo expand: error: {tmp_path / 'empty.jsonl'} holds no annotation line: "
            "nothing to expand"
        )


def test_expand_help_explains_itself(capsys):
    from lit_grpo.__main__ import main

    assert main(["--help"]) == 0 and "expand" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["expand", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--annotations" in text and "45, 90, 135, 180" in text and "--seed" in text


def test_background_l1_uses_the_segmenters_masks_without_true_ones():
    from lit_grpo.metrics.spatial import BackgroundL1
    from lit_grpo.perception import ColourSegmenter

    data = ShapeWorld("train", 4, 16, ("translate",), seed=1)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    edits = batch["target"].clone()
    edits[:, :, :2] = 0.0  # damage two rows of the background
    seg = ColourSegmenter()
    before, after = seg(batch["source"], batch["object"]), seg(edits, batch["object"])
    metric = BackgroundL1(dilate=0)
    true = metric.values(batch["source"], edits, batch, before, after)
    real = {k: v for k, v in batch.items() if k not in ("mask_before", "mask_after")}
    seen = metric.values(batch["source"], edits, real, before, after)
    outside = ~(before.mask | after.mask)
    diff = (edits - batch["source"]).abs().mean(1)
    assert torch.allclose(seen, (diff * outside).sum((1, 2)) / outside.sum((1, 2)))
    outside_true = ~(batch["mask_before"] | batch["mask_after"])
    assert torch.allclose(true, (diff * outside_true).sum((1, 2)) / outside_true.sum((1, 2)))
    assert not torch.equal(outside, outside_true) and not torch.allclose(seen, true)
