"""Exploration strategies: which denoising steps inject SDE noise and which ones train.

A strategy turns a schedule of T steps into a `SamplingPlan`; the GRPO stage runs the plan and
never branches on the strategy (shared/STYLE.md: separate pieces, not mode flags).

| strategy        | SDE steps          | trained steps | after the SDE steps            | NFE sample/train |
| --------------- | ------------------ | ------------- | ------------------------------ | ---------------- |
| FullTrajectory  | 0 .. T-2           | the same      | one ODE step to sigma = 0      | T / T-1          |
| SlidingWindow   | s .. s+W-1         | the same      | ODE steps to the end           | T / W            |
| EarlyExit       | 0 .. K-1           | the same      | one-step shortcut x0 = x - s*v | K+1 / K          |
| ODETrajectory   | none               | chosen steps  | (ODE throughout)               | T / len(steps)   |

The last step (sigma_next = 0) is never an SDE step: its Gaussian is degenerate.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingPlan:
    """sde_steps: steps that sample with the SDE and record log-probs; train_steps: the subset
    the policy gradient uses; exit_step: the step whose velocity jumps straight to the data
    estimate (None: the trajectory runs through every step)."""

    sde_steps: tuple[int, ...]
    train_steps: tuple[int, ...]
    exit_step: int | None = None

    def nfe(self, num_steps: int) -> tuple[int, int]:
        """(network evaluations to sample one rollout, trained steps per rollout)."""
        sample = num_steps if self.exit_step is None else self.exit_step + 1
        return sample, len(self.train_steps)


class SamplingStrategy:
    """Base: `plan(num_steps, train_step)` -> SamplingPlan. `train_step` (the GRPO iteration:
    rollout batches so far, not optimiser steps) lets a plan move during training (the
    sliding window)."""

    def plan(self, num_steps: int, train_step: int = 0) -> SamplingPlan:  # pragma: no cover
        raise NotImplementedError


class FullTrajectory(SamplingStrategy):
    """Flow-GRPO's default: SDE on every step but the last, all of them trained."""

    def plan(self, num_steps: int, train_step: int = 0) -> SamplingPlan:
        steps = tuple(range(num_steps - 1))
        return SamplingPlan(steps, steps)


class SlidingWindow(SamplingStrategy):
    """MixGRPO: SDE and training inside a window of `window` steps, ODE elsewhere.

    The window starts at step 0 and moves `stride` steps later every `shift_every` GRPO
    iterations (rollout batches; an iteration may take several optimiser steps), wrapping around once it reaches the last SDE-capable position (MixGRPO's
    progressive schedule); `shift_every: 0` keeps it fixed at `start`.
    """

    def __init__(self, window: int = 4, start: int = 0, shift_every: int = 0, stride: int = 1):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.start, self.shift_every, self.stride = window, start, shift_every, stride

    def plan(self, num_steps: int, train_step: int = 0) -> SamplingPlan:
        if self.window > num_steps - 1:
            raise ValueError(
                f"window {self.window} does not fit {num_steps} steps "
                f"(at most {num_steps - 1} SDE steps)"
            )
        positions = num_steps - self.window  # valid starts: 0 .. num_steps - 1 - window
        moved = (train_step // self.shift_every) * self.stride if self.shift_every else 0
        start = (self.start + moved) % positions
        steps = tuple(range(start, start + self.window))
        return SamplingPlan(steps, steps)


class EarlyExit(SamplingStrategy):
    """Talk2Move: SDE on steps 0..K-1, then the one-step ODE shortcut from step K to the data.

    `exit_step` is K; the early-exit callback (`lit_grpo.callbacks.EarlyExitSelector`) may set
    it during training from the within-group reward variance.
    """

    def __init__(self, exit_step: int = 4):
        if exit_step < 1:
            raise ValueError(f"exit_step must be >= 1, got {exit_step}")
        self.exit_step = exit_step

    def check_schedule(self, num_steps: int) -> None:
        """Refuse an exit step past a schedule of `num_steps` (`plan` would clamp it to the
        last step and train something else)."""
        if self.exit_step >= num_steps:
            raise ValueError(
                f"the EarlyExit strategy's exit_step {self.exit_step} is past the "
                f"schedule of sample_steps={num_steps} (steps 0..{num_steps - 1}); set "
                f"exit_step to at most {num_steps - 1} or raise sample_steps"
            )

    def plan(self, num_steps: int, train_step: int = 0) -> SamplingPlan:
        k = min(self.exit_step, num_steps - 1)
        steps = tuple(range(k))
        return SamplingPlan(steps, steps, exit_step=k)


class ODETrajectory(SamplingStrategy):
    """Neighbor GRPO (arXiv 2511.16955): deterministic ODE sampling throughout, the chosen
    steps recorded for training (the randomness of a group is in its initial noise only).

    `steps`: the schedule indices to train (None: every step). The paper trains on a subset
    of the timesteps and does not pin which; every step is our default at ShapeWorld's short
    schedules.
    """

    def __init__(self, steps: list[int] | None = None):
        if steps is not None and (not steps or min(steps) < 0):
            raise ValueError(f"steps must be non-empty schedule indices >= 0, got {steps}")
        self.steps = None if steps is None else tuple(sorted(set(steps)))

    def plan(self, num_steps: int, train_step: int = 0) -> SamplingPlan:
        steps = tuple(range(num_steps)) if self.steps is None else self.steps
        if max(steps) >= num_steps:
            raise ValueError(f"train steps {steps} do not fit a schedule of {num_steps} steps")
        return SamplingPlan((), steps)
