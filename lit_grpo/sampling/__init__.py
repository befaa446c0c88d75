"""Sigma schedules and sampler steps (torch only, no Lightning)."""

from lit_grpo.sampling.flow import (
    add_noise,
    ode_step,
    randn_like,
    sample_sigmas,
    shortcut_to_data,
    sigma_schedule,
    velocity_target,
)
from lit_grpo.sampling.ode import SourceBlend, sample_ode

__all__ = [
    "SourceBlend",
    "add_noise",
    "ode_step",
    "randn_like",
    "sample_ode",
    "sample_sigmas",
    "shortcut_to_data",
    "sigma_schedule",
    "velocity_target",
]
