"""Deterministic (ODE) sampling, the evaluation sampler of every method.

The loop stays visible here, diffusers-style: the schedule is separate from the model.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_grpo.sampling.flow import add_noise, ode_step, sigma_schedule

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x [N, ...], sigma [N]) -> v [N, ...]


@dataclass(frozen=True)
class SourceBlend:
    """Keep the source outside an editable region, at every step (an inference option).

    Blended Latent Diffusion's step (Avrahami, Fried and Lischinski, 2023, Algorithm 1):
    after each denoising step the latents outside the region are replaced by the source's
    latents noised to the step's new noise level,

        x <- m * x + (1 - m) * ((1 - sigma_next) * source + sigma_next * noise),

    so the last step (sigma 0) returns the source's latents there exactly, and the region is
    denoised beside a background that is the source's all the way down.

    Ours: the source is noised with the sampler's own initial noise (the point of the straight
    path from that noise to the source; the paper draws fresh noise for the DDPM forward
    process), and `editable` may be fractional (a latent's share of the region).
    """

    source: Tensor  # the source's latents x0 [N, C, h, w]
    editable: Tensor  # [N, 1, h, w] (or broadcastable): 1 where the edit may change latents

    def __call__(self, x: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        background = add_noise(self.source, noise, sigma.expand(x.shape[0]))
        m = self.editable.to(x.dtype)
        return m * x + (1 - m) * background


@torch.no_grad()
def sample_ode(
    velocity: VelocityFn,
    noise: Tensor,
    steps: int = 10,
    shift: float = 1.0,
    blend: SourceBlend | None = None,
) -> Tensor:
    """Integrate from pure noise (sigma = 1) to data (sigma = 0) with `steps` Euler steps;
    with `blend`, the source is put back outside its region after every step."""
    sigmas = sigma_schedule(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        sigma = sigmas[i].expand(x.shape[0])
        x = ode_step(x, velocity(x, sigma), sigmas[i], sigmas[i + 1])
        if blend is not None:
            x = blend(x, noise, sigmas[i + 1])
    return x
