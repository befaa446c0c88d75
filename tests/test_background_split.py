"""benchmarks/background_split.py: the background L1's parts, by hand and against eval_edits."""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from background_split import main, split  # noqa: E402


def test_split_by_hand():
    # one 12 x 12 edit; the object was at (1, 1) and should be at (1, 4); it was drawn at
    # (1, 7), another object sits at (8, 8); the edit changed one pixel in each place
    n, size = 1, 12
    mask = lambda y, x: torch.zeros(n, size, size, dtype=torch.bool).index_put_(  # noqa: E731
        (torch.tensor([0]), torch.tensor([y]), torch.tensor([x])), torch.tensor(True)
    )
    source = torch.zeros(n, 3, size, size)
    edited = source.clone()
    edited[:, :, 1, 8] = 0.3  # next to where the object was drawn: "drawn"
    edited[:, :, 8, 8] = 0.6  # the other object: "others"
    edited[:, :, 11, 0] = 0.9  # a corner, 8 px from the nearest object: "plain"
    edited[:, :, 2, 2] = 1.0  # next to the old place: not background
    places = mask(1, 1), mask(1, 4), mask(1, 7), mask(8, 8)
    parts, by_distance, pixels, signed, plain, offset = split(source, edited, *places)
    keep = 144 - 9 - 9  # the two true places grown by 1 px
    assert parts["drawn"].item() == pytest.approx(0.3 / keep)
    assert parts["others"].item() == pytest.approx(0.6 / keep)
    assert parts["plain"].item() == pytest.approx(0.9 / keep)
    # the corner (11, 0) is 8 px (Chebyshev) from the other object (8, 8), 10 px from the
    # old place (1, 1): the last bin (8 px or more)
    assert by_distance[0, -1].item() == pytest.approx(0.9)
    assert by_distance[0, :-1].sum().item() == 0
    assert pixels.sum().item() == plain.item() == keep - 9 - 1  # minus drawn's 3x3, other
    assert signed.item() == pytest.approx(0.9)
    assert offset.item() == pytest.approx(0.9)  # one shade, the same in every channel
    # the corner +0.3 in red and -0.3 in green: no signed change, an offset of 0.2 in sum
    edited[:, :, 11, 0] = torch.tensor([0.3, -0.3, 0.0])
    *_, signed, _, offset = split(source, edited, *places)
    assert signed.item() == pytest.approx(0.0, abs=1e-7)
    assert offset.item() == pytest.approx(0.2)


def test_parts_add_up_to_eval_edits_background_l1(capsys):
    from eval_edits import evaluate

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception.segmenters import ColourSegmenter
    from lit_grpo.policies.weights import load_policy

    assert main(["--weights", "shapeworld-sft", "--n", "8", "--batch-size", "8"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "shapeworld-sft" in line)
    bg, drawn, others, plain = (float(v) for v in row.split()[1:5])
    assert bg == pytest.approx(drawn + others + plain, abs=2e-4)  # printed to 4 places
    data = ShapeWorld("test", 8, 32, ("translate",), seed=0, objects=(2, 3))
    policy = load_policy("shapeworld-sft").eval()
    with torch.no_grad():
        _, _, l1 = evaluate(policy, data, 8, 10, 0, ColourSegmenter(), partial(iter))
    expected = sum(l1["translate"]["background"]) / 8
    assert bg == pytest.approx(expected, abs=1e-4)
    assert plain > 0
