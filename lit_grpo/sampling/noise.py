"""Noise builders: where a rollout group's randomness comes from.

A builder draws the initial latents of a group of rollouts and the fresh noise of every SDE
step. The rollout sampler (`lit_grpo.sampling.rollout`) asks it for both and never draws
noise itself, so a method that changes where a group may differ (RC-GRPO's region-decoupled
noise: shared outside the edit region, independent inside) is a new builder, not a new
sampler.

Rows are laid out in groups: N = B * G, the G rollouts of a condition contiguous.
`regions` ([N, h, w] in [0, 1], the edit region at latent resolution, 1 inside) is passed to
every call for builders that need it: `RegionDecoupledNoise` does, the others ignore it.
"""

import torch
from torch import Tensor

from lit_grpo.sampling.flow import randn_like


class NoiseBuilder:
    """Independent standard normal noise for every rollout and step (Flow-GRPO's default)."""

    def initial(
        self,
        like: Tensor,
        group_size: int,
        generator: torch.Generator | None = None,
        regions: Tensor | None = None,
    ) -> Tensor:
        """The latents at sigma = 1, shaped and typed like `like` [N, C, h, w]."""
        return randn_like(like, generator)

    def step(
        self,
        like: Tensor,
        group_size: int,
        step: int,
        generator: torch.Generator | None = None,
        regions: Tensor | None = None,
    ) -> Tensor:
        """The standard normal noise of SDE step `step`, shaped like `like` [N, C, h, w]."""
        return randn_like(like, generator)


class IndependentNoise(NoiseBuilder):
    """Every rollout draws its own initial latents and step noise (the default)."""


class SharedInitialNoise(NoiseBuilder):
    """The G rollouts of a group start from the same initial latents; the SDE steps still
    draw independent noise, so the group differs only through exploration (the "shared
    initial noise within a group" option of Flow-GRPO-style trainers)."""

    def initial(self, like, group_size, generator=None, regions=None) -> Tensor:
        if like.shape[0] % group_size:
            raise ValueError(f"{like.shape[0]} rows do not split into groups of {group_size}")
        one = randn_like(like[::group_size], generator)  # [B, C, h, w]
        return one.repeat_interleave(group_size, 0)


class RegionDecoupledNoise(NoiseBuilder):
    """RC-GRPO-Editing's region-decoupled noise: within a group, shared outside the edit
    region, each rollout's own inside it.

    With `regions` m ([N, h, w] coverage in [0, 1], the edit region at latent resolution),
    a group's shared draw eps* ([B, C, h, w]) and each rollout's own delta ([N, C, h, w]),
    element by element:

        x_i = sqrt(1 - s^2) * eps* + s * delta_i,     s = perturbation * m

    Outside the region (m = 0) every rollout of a group starts from eps*; inside (m = 1) with
    `perturbation` 1 each draws its own noise (the paper's region-decoupled perturbation),
    with `perturbation` sigma < 1 it is Neighbor GRPO's perturbed neighbour of eps* (arXiv
    2511.16955, eq. 7: sqrt(1 - sigma^2) eps* + sigma delta). A soft edge (0 < m < 1) blends
    the two with the variance kept at 1 everywhere, so every rollout on its own is still a
    standard normal draw; two rollouts of a group correlate by 1 - s^2 per element.

    `mask_sde`: the SDE steps' noise is decoupled the same way (perturbation 1), our
    extension (the paper samples with the ODE). Outside the region it is *shared* within
    the group rather than zero: Flow-GRPO's SDE mean carries a drift correction that assumes
    the noise is injected, so zero noise outside would pull the background off the
    marginals the model was trained on (towards an over-denoised image), and the recorded
    log-probabilities would score transitions the policy never samples. Shared noise keeps
    every rollout a genuine SDE sample; note it keeps the group identical outside the region
    only while the trajectories agree there: the velocity sees the whole image, so a
    difference inside can still spread out through the network. Without `mask_sde` the SDE
    steps draw independent noise (Flow-GRPO's).

    Departures from the paper: the region is a coverage in [0, 1] rather than a binary mask
    (latent cells on the region's edge are partly inside); `perturbation` is exposed so the
    same builder serves Neighbor GRPO's neighbourhoods.
    """

    def __init__(self, perturbation: float = 1.0, mask_sde: bool = False):
        if not 0.0 < perturbation <= 1.0:
            raise ValueError(f"perturbation must be in (0, 1], got {perturbation}")
        self.perturbation, self.mask_sde = perturbation, mask_sde

    def initial(self, like, group_size, generator=None, regions=None) -> Tensor:
        return self._decoupled(like, group_size, generator, regions, self.perturbation)

    def step(self, like, group_size, step, generator=None, regions=None) -> Tensor:
        if not self.mask_sde:
            return randn_like(like, generator)
        return self._decoupled(like, group_size, generator, regions, 1.0)

    @staticmethod
    def _decoupled(like, group_size, generator, regions, perturbation) -> Tensor:
        n = like.shape[0]
        if regions is None:
            raise ValueError(
                "RegionDecoupledNoise needs the edit regions ([N, h, w] at latent resolution); "
                "sample with lit_grpo.modules.RCGRPOModule, which passes them to the sampler"
            )
        if n % group_size:
            raise ValueError(f"{n} rows do not split into groups of {group_size}")
        if regions.shape != (n, *like.shape[-2:]):
            raise ValueError(
                f"regions must be [N, h, w] = {(n, *like.shape[-2:])}, got {tuple(regions.shape)}"
            )
        shared = randn_like(like[::group_size], generator).float()  # [B, C, h, w]
        own = randn_like(like, generator).float()  # [N, C, h, w]
        s = (perturbation * regions.float().clamp(0, 1))[:, None]  # [N, 1, h, w]
        mixed = (1 - s**2).sqrt() * shared.repeat_interleave(group_size, 0) + s * own
        return mixed.to(like.dtype)
