"""Deterministic (ODE) sampling, the evaluation sampler of every method.

The loop stays visible here, diffusers-style: the schedule is separate from the model.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from lit_grpo.sampling.flow import ode_step, sigma_schedule

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x [N, ...], sigma [N]) -> v [N, ...]


@torch.no_grad()
def sample_ode(velocity: VelocityFn, noise: Tensor, steps: int = 10, shift: float = 1.0) -> Tensor:
    """Integrate from pure noise (sigma = 1) to data (sigma = 0) with `steps` Euler steps."""
    sigmas = sigma_schedule(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        sigma = sigmas[i].expand(x.shape[0])
        x = ode_step(x, velocity(x, sigma), sigmas[i], sigmas[i + 1])
    return x
