"""The Flow-GRPO SDE step with its Gaussian log-probability.

Turning the flow ODE into an SDE with the same marginals lets one condition yield a group of
different rollouts, and gives each step a tractable policy probability. With
dt = sigma_next - sigma (< 0) and noise level a (Talk2Move: 1.0):

    std    = a * sqrt(sigma / (1 - sigma))        (at sigma = 1: 1 - sigma_next underneath)
    mean   = x * (1 + std^2 / (2 sigma) * dt) + v * (1 + std^2 (1 - sigma) / (2 sigma)) * dt
    x_next = mean + std * sqrt(-dt) * eps
    log p  = log N(x_next; mean, (std * sqrt(-dt))^2 I)     in float32

Reduction is a named choice: "mean" over the non-batch dimensions is what the Flow-GRPO
reference code does (its clip range is tuned to it), "sum" is the exact joint density,
"none" keeps the per-element terms that region methods weight by token.
The last step (sigma_next = 0) has a degenerate Gaussian and is never trained.

The sample comes back in float32 whatever the dtype of x: a rollout stores exactly the
transition its log-probability scored, so with bf16 latents the first ratio is still 1
(casting it back to bf16 moved it by up to 7e-5, a third of Talk2Move's clip range).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_grpo.sampling.flow import randn_like

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class SDEStep:
    """sample: x_next [N, ...] (float32); mean [N, ...]; std: the per-sample std of x_next
    [N] (`diffusion * sqrt(-dt)`); diffusion: the sigma-level std [N] (`sde_std`, the
    denominator of Flow-GRPO's KL); log_prob: [N] (reduced) or [N, ...] (reduction "none")."""

    sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    diffusion: Tensor


def sde_std(
    sigma: Tensor, sigma_next: Tensor, noise_level: float, sigma_max: Tensor | None = None
) -> Tensor:
    """The SDE's diffusion coefficient `std` (before the sqrt(-dt) factor), shape of sigma.

    `sigma_max` replaces sigma in the denominator where sigma == 1 (the first step of a
    schedule that starts at pure noise); the Flow-GRPO code uses the schedule's second sigma.
    """
    sigma = sigma.double()
    under = torch.where(
        sigma >= 1.0, (sigma_max if sigma_max is not None else sigma_next).double(), sigma
    )
    return (noise_level * torch.sqrt(sigma / (1 - under))).float()


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float = 1.0,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    sigma_max: Tensor | None = None,
    validate: bool = True,
) -> SDEStep:
    """One SDE step from x at sigma to sigma_next; sigma, sigma_next are [N] or scalars.

    With `prev_sample`, no noise is drawn: the step scores that sample (the training-time
    recomputation of a rollout's log-probability under the current policy).
    `validate` checks sigma_next > 0, which reads a value back from the device (a host sync);
    the rollout sampler checks its plan against the schedule once instead and passes False.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = torch.as_tensor(sigma, device=x.device).float().expand(x.shape[0]).reshape(shape)
    sigma_next = (
        torch.as_tensor(sigma_next, device=x.device).float().expand(x.shape[0]).reshape(shape)
    )
    if validate and torch.any(sigma_next <= 0):
        raise ValueError("the SDE step to sigma = 0 is degenerate; use the ODE step there")
    xf, vf = x.float(), v.float()
    dt = sigma_next - sigma
    sm = None if sigma_max is None else torch.as_tensor(sigma_max, device=x.device).float()
    std = sde_std(sigma, sigma_next, noise_level, sm)
    mean = xf * (1 + std**2 / (2 * sigma) * dt) + vf * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * torch.sqrt(-dt)  # the std of x_next
    if prev_sample is None:
        if noise is None:
            noise = randn_like(x, generator)
        prev_sample = mean + scale * noise.float()
    sample = prev_sample.float()
    log_prob = (
        -((sample - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    )
    return SDEStep(
        sample, mean, scale.flatten(), reduce_log_prob(log_prob, reduction), std.flatten()
    )


def reduce_log_prob(elements: Tensor, reduction: str = "mean") -> Tensor:
    """Per-element log-probs [N, ...] -> [N] ("mean", "sum") or unchanged ("none")."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "mean":
        return elements.flatten(1).mean(1)
    if reduction == "sum":
        return elements.flatten(1).sum(1)
    return elements
