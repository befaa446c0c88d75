"""A hold on the scene at every noise level (ours, issue 23; no paper's).

Why: a KL to the reference on the trained SDE steps holds the scene only where the update
looks. With early exit the update sees steps 0-3 of 10; the late steps run as a one-step
shortcut while training and are never rescored, yet at evaluation they make a third of the
background change over the SFT editor (docs/benchmarks.md, "Where the remaining change is
made"). And the SDE KL weighs a unit of velocity change by dt^2 / (2 std^2), which differs
by an order of magnitude from step to step.

What: the squared velocity difference between the policy and its reference (the adapter-off
SFT editor) on forward-process states of the rollouts' own clean edits, per latent element,
pooled to tokens and averaged over the held regions' tokens as the region KL is:

    hold(row) = region_mean_r( cover_r, mean_{elements of token} (v_theta(x_s) - v_ref(x_s))^2 )
    x_s = (1 - s) x0 + s eps,   s a level of the sampling schedule, eps ~ N(0, I)

One level per loss term, drawn uniformly from all `sample_steps` levels of the schedule
(the trained ones and the late ones alike) with the update's generator, so a resumed run
draws the same; the noise eps per row and term from the same generator. It is an unclipped
penalty with no advantage: it pulls the policy's velocity on the other objects' and the
background's tokens towards the SFT editor's at every level, whatever the rollout's reward,
and leaves the edit region free. Forward-process states of the policy's own edits, not of
the source image: pulled to the source, the editor learns to copy it (docs/benchmarks.md).
The penalty's weight (`beta`) is on this scale (velocity units squared), not the KL's.
"""

import weakref

import torch
from torch import Tensor

from lit_grpo.objectives.base import record_noise
from lit_grpo.sampling.flow import add_noise, sigma_schedule


def velocity_hold(v: Tensor, v_ref: Tensor, latent_to_tokens) -> Tensor:
    """Per token [N, T]: the mean over each token's latent elements of (v - v_ref)^2 (v, v_ref
    [N, C, h, w]; latent_to_tokens: the policy's per-element -> per-token mean). The region
    objective averages it over the held regions' tokens (`spatialflow.region_mean`)."""
    return latent_to_tokens((v.float() - v_ref.float()) ** 2)


class HoldDraws:
    """The levels and noise of one record's hold terms, drawn once per record (not per inner
    epoch) from the update's CPU generator. Only a weak reference to the record is kept."""

    def __init__(self):
        self._record, self.fractions, self.noise = None, None, None

    def prepare(self, record, terms: int, generator=None) -> None:
        """fractions: `terms` uniform draws in [0, 1) (a Python list: no device read), the
        levels as a fraction of the schedule; noise: [N, terms, C, h, w] on the record's
        device."""
        if self._record is not None and self._record() is record:
            return
        self.fractions = torch.rand(terms, generator=generator, dtype=torch.float64).tolist()
        self.noise = record_noise(record, terms, generator)
        self._record = weakref.ref(record)

    def level(self, k: int, steps: int) -> int:
        """Term k's schedule index, uniform over the `steps` levels [0, steps)."""
        return min(int(self.fractions[k] * steps), steps - 1)


def hold_state(
    x0: Tensor, noise: Tensor, level: int, steps: int, shift: float
) -> tuple[Tensor, Tensor]:
    """(x_s [n, C, h, w], s [n]) at schedule index `level` of a `steps`-step schedule."""
    sigma = sigma_schedule(steps, shift, x0.device)[level].expand(x0.shape[0])
    return add_noise(x0.float(), noise, sigma), sigma
