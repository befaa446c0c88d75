"""`compare` and `edit` as a user runs them: two short fits then a comparison; one edit."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY as CLI_TINY

from lit_grpo.__main__ import main
from lit_grpo.commands.compare import PANEL_PX

ROOT = Path(__file__).resolve().parent.parent
# test_cli's tiny editor, two steps validated once, without checkpoints or callbacks
TINY = [
    *(a for a in CLI_TINY if not a.startswith("--trainer.max_steps")),
    "--trainer.max_steps=2",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.callbacks=[]",
]
RUNS = {"lr-small": ("1e-3", "a"), "lr-large": ("3e-3", "b")}  # name: (lr, tag variant)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two SFT runs that differ in lr (and a tag), in a sqlite store named by the env var."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/runs.db")
        for name, (lr, variant) in RUNS.items():
            code = main(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs/sft.yaml"),
                    *TINY,
                    f"--model.init_args.lr={lr}",
                    f"--trainer.logger.init_args.run_name={name}",
                    f'--trainer.logger.init_args.tags={{"variant": "{variant}"}}',
                ]
            )
            assert code == 0
    return root


@pytest.fixture
def in_store(store, tmp_path, monkeypatch):
    """A fresh working directory, with the store of the two runs named by the env var."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/runs.db")
    return tmp_path


def test_compare_prints_both_runs_and_writes_the_png(in_store, capsys):
    assert main(["compare"]) == 0
    out = capsys.readouterr().out
    assert "experiment  shapeworld-sft" in out and "2 runs" in out
    header = next(line for line in out.splitlines() if "lr-small" in line)
    assert "lr-large" in header
    # the one param that differs, with both values; identical ones are only counted
    (lr_row,) = [line for line in out.splitlines() if line.startswith("model.lr ")]
    assert lr_row.split()[1:] == ["0.001", "0.003"]
    assert "model.policy.width" not in out and "identical not shown" in out
    assert re.search(r"^val/loss\s+[\d.]+ @\d+\s+[\d.]+ @\d+$", out, re.M)
    assert re.search(r"^  min\s.*\*", out, re.M)  # best values, the best run starred

    # the image lands in the current directory, at the size compare reports
    png = in_store / "compare_shapeworld-sft.png"
    match = re.search(r"wrote (\S+) \((\d+)x(\d+) px, 2 panels: val/loss, train/loss\)", out)
    assert match and Path(match[1]) == png
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (int(match[2]), int(match[3])) == (2 * PANEL_PX[0], PANEL_PX[1])
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # curves and text, not a blank canvas


def test_compare_filters_by_run_name_id_and_tag(in_store, capsys):
    assert main(["compare", "--runs", "lr-large", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "lr-large" in out and "lr-small" not in out and ": 1 run\n" in out
    assert not list(in_store.glob("*.png"))

    assert main(["compare", "--tag", "variant=a", "--metrics", "train/*", "--out", "a.png"]) == 0
    out = capsys.readouterr().out
    assert "lr-small" in out and "lr-large" not in out
    with Image.open(in_store / "a.png") as image:
        assert image.size == PANEL_PX  # one metric, one panel

    # an id prefix, as the table prints it, selects the same run as its name
    run_id = re.search(r"^run id\s+(\w+)", out, re.M)[1]
    assert main(["compare", "--runs", run_id, "lr-large", "--no-plot"]) == 0
    header = capsys.readouterr().out.splitlines()[3]
    assert header.split() == ["lr-small", "lr-large"]  # in the order asked for


def test_compare_errors_name_what_is_wrong(in_store, capsys, monkeypatch):
    assert main(["compare", "--experiment", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert "no experiment 'no-such-experiment'" in err and "shapeworld-sft" in err
    assert main(["compare", "--runs", "lr-huge"]) == 2
    err = capsys.readouterr().err
    assert "no run named 'lr-huge'" in err and "lr-small" in err
    assert main(["compare", "--metrics", "val/rewrd"]) == 2
    assert "val/loss" in capsys.readouterr().err  # lists what was logged
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0 and "min for metrics whose name" in capsys.readouterr().out

    # no store at all: an error, and no empty store created in its place
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["compare"]) == 2
    assert "no MLflow store here" in capsys.readouterr().err
    assert not (in_store / "mlruns").exists()


@pytest.fixture
def shapeworld_png(tmp_path):
    """A test-split scene whose instruction the built-in editor follows at every seed tried."""
    from lit_grpo.datamodules.shapeworld import ShapeWorld

    sample = ShapeWorld("test", 3, 32, tasks=("translate",))[2]
    assert sample["instruction"] == "move the green triangle to the right"
    path = tmp_path / "in.png"
    array = (sample["source"].permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).save(path)
    return path, sample


def test_edit_moves_the_object_as_instructed(shapeworld_png, tmp_path, capsys):
    from lit_grpo.perception.segmenters import ColourSegmenter

    path, sample = shapeworld_png
    out = tmp_path / "out" / "edited.png"
    args = ["edit", "--image", str(path), "--instruction", sample["instruction"]]
    assert main([*args, "--out", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "TinyEditPolicy" in printed and f"wrote   {out} (32x32 px)" in printed

    with Image.open(out) as image:
        assert image.size == (32, 32)
        edited = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) / 255
    found = ColourSegmenter()(torch.stack([sample["source"], edited]), [sample["object"]] * 2)
    assert found.found.all()
    dx, dy = (found.centre[1] - found.centre[0]).tolist()
    assert dx > 4 and abs(dy) < 2, (dx, dy)  # asked for +8 px to the right


def test_edit_errors_name_the_file(shapeworld_png, tmp_path, capsys):
    path, sample = shapeworld_png
    out = str(tmp_path / "out.png")
    assert main(["edit", "--image", "gone.png", "--instruction", "x", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "input image (--image) not found" in err and "gone.png" in err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    assert main(["edit", "--image", str(corrupt), "--instruction", "x", "--out", out]) == 2
    assert f"cannot read {corrupt} as an image" in capsys.readouterr().err
    args = ["edit", "--image", str(path), "--instruction", "x", "--out", out]
    assert main([*args, "--ckpt", "missing.ckpt"]) == 2
    assert "checkpoint (--ckpt) not found" in capsys.readouterr().err
    assert not Path(out).exists()

    # unknown words are named, and the edit still runs
    assert main([*args[:3], "--instruction", "move the green blob right", *args[5:]]) == 0
    assert "does not know 'blob'" in capsys.readouterr().err and Path(out).exists()


def test_edit_with_a_mask_keeps_the_source_outside_it(shapeworld_png, tmp_path, capsys):
    from lit_grpo.perception import geometry as geo

    path, sample = shapeworld_png
    region = ~geo.outside_mask([sample["mask_before"][None], sample["mask_after"][None]], 2)[0]
    mask = tmp_path / "mask.png"
    Image.fromarray(region.numpy().astype(np.uint8) * 255).save(mask)
    out = tmp_path / "edited.png"
    args = ["edit", "--image", str(path), "--instruction", sample["instruction"]]
    assert main([*args, "--out", str(out), "--mask", str(mask)]) == 0
    share = region.float().mean().item()
    assert f"mask    {mask}: {share:.0%} of the image may change" in capsys.readouterr().out
    with Image.open(path) as source, Image.open(out) as edited:
        source, edited = np.array(source.convert("RGB")), np.array(edited.convert("RGB"))
    keep = ~region.numpy()
    assert (edited[keep] == source[keep]).all()  # to the byte
    assert (edited[~keep] != source[~keep]).any()  # and the object was redrawn inside

    # bad masks fail before the policy loads, naming the file and what is wrong
    small = tmp_path / "small.png"
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(small)
    assert main([*args, "--out", str(out), "--mask", str(small)]) == 2
    assert "is 16x16 px but the image is 32x32 px" in capsys.readouterr().err
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(black)
    assert main([*args, "--out", str(out), "--mask", str(black)]) == 2
    assert "marks no pixel as editable" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--mask", str(tmp_path / "gone.png")]) == 2
    assert "mask (--mask) not found" in capsys.readouterr().err


def test_a_mask_follows_the_image_to_the_edit_size():
    from lit_grpo.commands.edit import mask_at

    mask = torch.tensor([[True, False], [False, False]])
    grown = torch.zeros(4, 4, dtype=torch.bool)
    grown[:2, :2] = True
    assert torch.equal(mask_at(mask, (4, 4)), grown)
    assert mask_at(mask, (2, 2)) is mask


def test_export_keeps_the_policy_and_its_resolution(tmp_path, capsys):
    from lit_grpo.policies.weights import load_policy, recorded_resolution

    out = tmp_path / "editor.safetensors"
    assert main(["export", "shapeworld-sft", str(out)]) == 0
    assert "wrote TinyEditPolicy" in capsys.readouterr().out
    assert recorded_resolution(str(out)) == (32, 32)
    original, copy = load_policy("shapeworld-sft").state_dict(), load_policy(str(out)).state_dict()
    assert original.keys() == copy.keys()
    assert all(torch.equal(original[k], copy[k]) for k in original)
