"""benchmarks/copy_shift.py: the copy offset by hand, the regions, the hook and the table."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from copy_shift import SourceAttention, copy_offset, main, token_regions  # noqa: E402


def shifted_attention(rows: int, cols: int, dr: int, dc: int) -> torch.Tensor:
    """[1, T, T]: each target token reads the source token (dr, dc) away (clamped at the
    border), all of its attention."""
    t = rows * cols
    att = torch.zeros(1, t, t)
    for i in range(t):
        r, c = divmod(i, cols)
        rr, cc = min(max(r + dr, 0), rows - 1), min(max(c + dc, 0), cols - 1)
        att[0, i, rr * cols + cc] = 1.0
    return att


def test_copy_offset_by_hand():
    right, up = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, -1.0]])
    # a move right copies from the left: 2 tokens behind the move; the token in column 0
    # (and 1) is clamped at the border and reads its own column (1 token) or column 0
    att = shifted_attention(4, 4, 0, -2)
    shift = copy_offset(att, 4, 4, right).view(4, 4)
    assert shift[:, 2:].eq(-2).all() and shift[:, 1].eq(-1).all() and shift[:, 0].eq(0).all()
    # the same attention read against a move up: a sideways copy is no shift along it
    assert copy_offset(att, 4, 4, up).abs().max() == 0
    # a move up copies from below (row + 1): -1 along "up"
    shift = copy_offset(shifted_attention(4, 4, 1, 0), 4, 4, up).view(4, 4)
    assert shift[:3].eq(-1).all() and shift[3].eq(0).all()
    # half the attention on the own place, half one token behind: -0.5; unnormalised
    # weights (attention also on text and target tokens) are renormalised
    att = 0.5 * torch.eye(16)[None] + 0.5 * shifted_attention(4, 4, 0, -1)
    shift = copy_offset(0.4 * att, 4, 4, right).view(4, 4)
    assert torch.allclose(shift[:, 1:], torch.full((4, 3), -0.5))


def test_token_regions():
    before = torch.zeros(1, 16, 16, dtype=torch.bool)
    before[0, 5, 5] = True  # the edited object: grown by 1 px, pixels 4-6 -> tokens 1
    after = torch.zeros_like(before)
    after[0, 5, 13] = True  # its new place: pixels 12-14 -> token column 3
    others = torch.zeros_like(before)
    others[0, 13, 1] = True  # another object in token (3, 0)
    bg, oth = token_regions(before, after, others, patch=4)
    bg, oth = bg.view(4, 4), oth.view(4, 4)
    assert oth.sum() == 1 and oth[3, 0]
    edit = torch.zeros(4, 4, dtype=torch.bool)
    edit[1, 1] = edit[1, 3] = True
    assert torch.equal(bg, ~edit & ~oth)


def test_hook_reads_the_layers_own_attention():
    from lit_grpo.policies.weights import load_policy

    policy = load_policy("shapeworld-sft").eval()
    grid = policy.token_grid((32, 32))
    hook = SourceAttention(grid[0] * grid[1])
    handle = policy.denoiser.blocks[-1].attn.register_forward_hook(hook)
    source = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        policy.edit(source, ["move the red circle left"] * 2, 3)
    handle.remove()
    assert len(hook.maps) == 3  # one per ODE step
    att = hook.maps[0]
    assert att.shape == (2, 64, 64) and (att >= 0).all()
    # the last layer of the SFT editor reads nearly only the source grid (a share of each
    # target token's attention, not a whole distribution, so at most 1)
    assert att.sum(-1).max() <= 1 + 1e-5 and att.sum(-1).mean() > 0.9


def test_table_from_the_cli(capsys):
    assert main(["--weights", "shapeworld-sft", "--n", "8", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("shapeworld-sft"))
    bg_shift, others_shift, same, bg_l1, others_l1 = (float(v) for v in row.split()[1:])
    assert -2 < bg_shift < 0.5 and -2 < others_shift < 0.5
    assert 0 < same <= 1 and 0 < bg_l1 < 0.1 and 0 < others_l1 < 0.5


def test_refuses_a_backbone_it_cannot_read(monkeypatch):
    import copy_shift

    from lit_grpo.policies import weights

    monkeypatch.setattr(weights, "load_policy", lambda w: torch.nn.Linear(1, 1))
    with pytest.raises(SystemExit):
        copy_shift.main(["--weights", "x", "--n", "8"])
