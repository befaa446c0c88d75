"""Exploration strategies: which denoising steps inject SDE noise and which ones train.

A strategy turns a schedule of T steps into a plan; the GRPO stage runs the plan and never
branches on the strategy. Issue-4 strategies (sliding window, early exit) add classes here.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingPlan:
    """sde_steps: steps that sample with the SDE (and record log-probs); train_steps: the
    subset the policy gradient uses; exit_step: where an ODE shortcut jumps to the end (None:
    the trajectory runs to the last step)."""

    sde_steps: tuple[int, ...]
    train_steps: tuple[int, ...]
    exit_step: int | None = None


class SamplingStrategy:
    """Base: `plan(num_steps)` -> SamplingPlan."""

    def plan(self, num_steps: int) -> SamplingPlan:  # pragma: no cover - interface
        raise NotImplementedError


class FullTrajectory(SamplingStrategy):
    """Flow-GRPO's default: SDE on every step but the last (sigma_next = 0 is degenerate), all
    of them trained."""

    def plan(self, num_steps: int) -> SamplingPlan:
        steps = tuple(range(num_steps - 1))
        return SamplingPlan(steps, steps)
