"""Noise builders: where a rollout group's randomness comes from.

A builder draws the initial latents of a group of rollouts and the fresh noise of every SDE
step. The rollout sampler (`lit_grpo.sampling.rollout`) asks it for both and never draws
noise itself, so a method that changes where a group may differ (RC-GRPO's region-decoupled
noise: shared outside the edit region, independent inside) is a new builder, not a new
sampler.

Rows are laid out in groups: N = B * G, the G rollouts of a condition contiguous.
`regions` ([N, h, w] in [0, 1], the edit region at latent resolution, 1 inside) is passed to
every call for builders that need it; the two here ignore it.
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
