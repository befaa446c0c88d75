"""The flow-matching convention used everywhere in lit_grpo.

    x_sigma = (1 - sigma) * x0 + sigma * noise,    sigma from 1 (noise) to 0 (data)
    v       = noise - x0                            (what every policy predicts)

Samplers, rewards and modules rely on this one convention; policies that wrap a backbone
with a different time parameterisation (diffusers' `timestep = sigma * 1000`) convert
inside the policy, never outside it.
"""

import torch
from torch import Tensor


def sigma_schedule(steps: int, shift: float = 1.0, device: torch.device | None = None) -> Tensor:
    """`steps + 1` sigmas from 1 down to 0, shifted as in diffusers' FlowMatchEulerDiscreteScheduler.

    shift > 1 spends more steps at high noise: `s * sigma / (1 + (s - 1) * sigma)`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.float()  # [T + 1]


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma for a batch; sigma is [N] and broadcast over the other dimensions."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def ode_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Euler step of the probability-flow ODE: x + (sigma_next - sigma) * v."""
    dt = _broadcast(sigma_next, x) - _broadcast(sigma, x)
    return x + dt * v


def shortcut_to_data(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """One-step jump from x_sigma to the data estimate: x0_hat = x - sigma * v."""
    return x - _broadcast(sigma, x) * v


def sample_sigmas(
    n: int, generator: torch.Generator | None = None, kind: str = "logit_normal", device=None
) -> Tensor:
    """Training sigmas for the flow-matching loss.

    `logit_normal` (SD3's choice: sigmoid of a standard normal) spends most samples at
    mid noise where the velocity is hardest to predict; `uniform` covers (0, 1) evenly.
    """
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    if kind == "uniform":
        # keep away from exactly 0 and 1, where x_sigma carries no information about one side
        return torch.rand(n, generator=generator, device=device) * (1 - 2e-3) + 1e-3
    raise ValueError(f"unknown sigma sampling {kind!r}; use 'logit_normal' or 'uniform'")


def _broadcast(sigma: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(sigma, Tensor) and sigma.ndim > 0:
        return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
    return float(sigma) if not isinstance(sigma, Tensor) else sigma.to(like.dtype)


__all__ = [
    "add_noise",
    "host_to_device",
    "ode_step",
    "randn_like",
    "sample_sigmas",
    "shortcut_to_data",
    "sigma_schedule",
    "velocity_target",
]


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, drawn in float32 on the generator's device (CPU
    generators keep seeded runs identical across devices) and moved to x's device without
    stalling the host (`host_to_device`); without a generator, on x's own device."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return host_to_device(noise, x.device).to(x.dtype)


def host_to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """`tensor` on `device`. From the CPU to a CUDA device the copy goes through pinned memory
    and does not block: a plain `.to("cuda")` of pageable memory waits for the GPU's queue to
    drain (a host sync), which would stall the pipeline at every SDE step."""
    device = torch.device(device)
    if tensor.device == device or tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
