"""A GRPO fit refuses, before its first rollout, a batch and group that cannot fit memory."""

import re

import pytest

from lit_grpo.checks import ConfigError
from lit_grpo.sampling.memory import GiB, available_bytes, check_rollout_memory, rollout_bytes
from lit_grpo.sampling.strategies import EarlyExit, ODETrajectory


def test_rollout_bytes_count_the_record_by_hand():
    sde = EarlyExit(exit_step=4).plan(10)  # 4 trained SDE steps
    # per row: 4 steps x (state, next state, log-probs) x 3*8*8 + latents 3*8*8 + image 3*32*32
    # floats, 4 bytes each, + 100 bytes of condition
    per_row = (4 * 3 * 192 + 192 + 3072) * 4 + 100
    assert rollout_bytes(6, sde, (3, 8, 8), (3, 32, 32), condition=100) == 6 * per_row
    ode = ODETrajectory(steps=[0, 1]).plan(4)  # no log-probs recorded
    assert rollout_bytes(1, ode, (3, 8, 8), (3, 32, 32)) == (2 * 2 * 192 + 192 + 3072) * 4


def test_the_refusal_names_the_estimate_and_what_to_lower():
    plan = EarlyExit(exit_step=4).plan(10)
    args = (4, 10_000, plan, (3, 32, 32), (3, 32, 32), 8000)
    check_rollout_memory(*args, available=8 * GiB, what="memory")  # 6.7 GiB: fits
    with pytest.raises(ConfigError) as err:
        check_rollout_memory(*args, available=4 * GiB, what="memory (MemAvailable)")
    assert str(err.value) == (
        "one GRPO step's rollouts need at least 6.7 GiB (40000 rollouts = batch_size 4 x "
        "group_size 10000, 4 trained steps of 3x32x32 float32 latents each), more than the "
        "4.0 GiB of memory (MemAvailable) available. Lower --model.init_args.group_size or "
        "--data.init_args.batch_size (or the trained steps: sample_steps, the strategy's "
        "exit_step)"
    )


def test_available_memory_is_read_from_the_kernel():
    import torch

    free, what = available_bytes(torch.device("cpu"))
    assert 0 < free and what == "memory (MemAvailable)"


def test_a_fit_whose_rollouts_cannot_fit_is_refused_before_the_first_step(in_tmp, capsys):
    from test_cli import GRPO_TINY, ROOT
    from test_user_errors import error_of

    fit = ["fit", "--config", str(ROOT / "configs/talk2move.yaml"), *GRPO_TINY]
    line = error_of(capsys, *fit, "--model.init_args.group_size=100000000")
    assert re.fullmatch(
        r"lit_grpo fit: error: one GRPO step's rollouts need at least \d+\.\d GiB \(200000000 "
        r"rollouts = batch_size 2 x group_size 100000000, 4 trained steps of 3x16x16 float32 "
        r"latents each\), more than the \d+\.\d GiB of memory \(MemAvailable\) available\. "
        r"Lower --model.init_args.group_size .*",
        line,
    ), line
    assert not list(in_tmp.rglob("*.ckpt"))  # nothing trained
