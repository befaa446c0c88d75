"""Sampling plans: which steps explore, which train, where the trajectory exits."""

import pytest
import torch

from lit_grpo.sampling.strategies import EarlyExit, FullTrajectory, SlidingWindow


def test_full_trajectory_plan():
    plan = FullTrajectory().plan(10)
    assert plan.sde_steps == plan.train_steps == tuple(range(9))
    assert plan.exit_step is None and plan.nfe(10) == (10, 9)


def test_sliding_window_moves_and_wraps():
    s = SlidingWindow(window=4, shift_every=2, stride=1)
    assert s.plan(10, 0).sde_steps == (0, 1, 2, 3)
    assert s.plan(10, 1).sde_steps == (0, 1, 2, 3)
    assert s.plan(10, 2).sde_steps == (1, 2, 3, 4)
    assert s.plan(10, 10).sde_steps == (5, 6, 7, 8)  # the last window that avoids step 9
    assert s.plan(10, 12).sde_steps == (0, 1, 2, 3)  # wraps around
    assert s.plan(10).nfe(10) == (10, 4)
    assert SlidingWindow(window=3, start=2).plan(10, 99).sde_steps == (2, 3, 4)
    with pytest.raises(ValueError, match="does not fit"):
        SlidingWindow(window=10).plan(10)


def test_early_exit_plan():
    plan = EarlyExit(exit_step=4).plan(10)
    assert plan.sde_steps == plan.train_steps == (0, 1, 2, 3)
    assert plan.exit_step == 4 and plan.nfe(10) == (5, 4)
    assert EarlyExit(exit_step=20).plan(10).exit_step == 9
    with pytest.raises(ValueError):
        EarlyExit(exit_step=0)


def test_early_exit_rollout_stops_at_k_and_trains_k_steps():
    from helpers import shapeworld_batch, tiny_module

    module = tiny_module(strategy=EarlyExit(exit_step=2), sample_steps=6)
    calls = []
    velocity = module.policy.velocity

    def counting(*args, **kw):
        calls.append(1)
        return velocity(*args, **kw)

    module.policy.velocity = counting
    rollout = module.sample(shapeworld_batch(), torch.Generator().manual_seed(0))
    assert len(calls) == 3  # 2 SDE steps + the shortcut evaluation
    assert rollout.states.shape[1] == 2 and rollout.log_probs().shape == (8, 2)
    assert rollout.images.min() >= 0 and rollout.images.max() <= 1
