"""benchmarks/eval_edits.py --blend-margin: edits sampled with the source kept outside the
true edit regions."""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from eval_edits import evaluate, main  # noqa: E402

from lit_grpo.datamodules.shapeworld import ShapeWorld  # noqa: E402
from lit_grpo.perception.segmenters import ColourSegmenter  # noqa: E402
from lit_grpo.policies.weights import load_policy  # noqa: E402


def run(margin):
    data = ShapeWorld("test", 8, 32, ("translate",), seed=0, objects=(2, 3))
    policy = load_policy("shapeworld-sft").eval()
    with torch.no_grad():
        return evaluate(policy, data, 8, 4, 0, ColourSegmenter(), partial(iter), margin)


def test_blending_at_the_measured_margin_keeps_background_and_other_objects():
    _, _, plain = run(None)
    _, _, blended = run(1)  # background L1 is measured outside the regions grown by 1 px
    assert min(plain["translate"]["background"]) > 0
    # the source, up to the editor's [0, 1] -> [-1, 1] -> [0, 1] rounding
    assert max(blended["translate"]["background"]) < 1e-6
    others = [v for v in blended["translate"]["others"] if v == v]  # scenes with another
    assert others and max(others) < 1e-6
    _, _, wide = run(4)  # a wider mask lets the editor change a ring around the regions
    assert 0 < sum(wide["translate"]["background"]) < sum(plain["translate"]["background"])


def test_the_table_says_it_blends_and_a_negative_margin_is_refused(capsys):
    args = ["--weights", "shapeworld-sft", "--n", "4", "--tasks", "scale", "--steps", "2"]
    assert main([*args, "--blend-margin", "2"]) == 0
    assert "source kept outside the true edit regions + 2 px" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--blend-margin", "-1"])
    assert "--blend-margin must be >= 0" in capsys.readouterr().err


def test_naming_the_sampling_device_keeps_the_table(capsys):
    """--device moves the policy and its inputs, and the edits back to be scored on the CPU;
    the noise is drawn on the CPU, so the table is the same on every device."""
    args = ["--weights", "shapeworld-sft", "--n", "4", "--tasks", "translate", "--steps", "2"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--device", "cpu", "--blend-margin", "1"]) == 0
    blended = capsys.readouterr().out
    assert main([*args, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == plain and blended != plain
