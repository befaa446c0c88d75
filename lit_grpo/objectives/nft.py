"""DiffusionNFT (Zheng et al., arXiv 2509.16117, ICLR 2026): reinforcement on the forward
process. No log-probability: the clean rollouts are noised again and the policy is trained
with flow matching, contrasting an implicit positive and an implicit negative policy.

    r        = 1/2 + 1/2 clip(A / C, -1, 1)       optimality in [0, 1]; A: group advantages
    x_s      = (1 - s) x0 + s eps                  eps fresh, s a noise level of the schedule
    v_target = eps - x0
    v+       = (1 - beta) v_old + beta v_theta     implicit positive policy
    v-       = (1 + beta) v_old - beta v_theta     implicit negative policy
    loss     = ( r l(v+) + (1 - r) l(v-) ) / beta  per image, mean over noise levels
    l(v)     = mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|),  x0_hat = x_s - s v

with v_old the velocity of the policy that sampled the rollouts (no gradient). The paper's
eq. writes r ||v+ - v||^2 + (1 - r) ||v- - v||^2 with r = 1/2 + 1/2 clip((r_raw -
E r_raw) / Z_c, -1, 1); the rest follows the official code (NVlabs/DiffusionNFT,
scripts/train_nft_sd3.py, as read in a public fork's copy): A is the GRPO advantage (reward minus group mean over the std)
and Z_c = C std with C = adv_clip_max = 5; each clean image is trained at every noise level
of the sampling schedule with fresh noise; l is the x0-space error divided by its own
detached mean absolute value ("adaptive weighting": in velocity terms s MSE / MAE, so a
level's weight grows with s and the loss's scale with the error's); the sum is divided by
beta (the gradient then does not shrink with beta). `adaptive_weighting: false` gives the
paper's plain squared velocity error.

Our choices where ShapeWorld needs one: v_old is a no-grad pass of the current policy at
the start of each update, i.e. the sampling policy itself (the official code samples with,
and takes v_old from, an "old" adapter that trails the trained one by a soft update; its
decay 0 is this). The reference (adapter-off) view would be the SFT editor instead, not the
policy that made the data, and the contrast between v+ and v- would then be measured from
the wrong place. The noise levels are the record's trained steps (`ODETrajectory`'s
sigmas): one loss term per level. The noise, and v_old with it, is drawn once per record
(from the module's generator, so a resumed run draws the same) and reused across inner
epochs. The official code's extra factor C on the loss (a constant) is dropped. An optional `kl_beta` adds the official
code's penalty, mean((v_theta - v_ref)^2), against the adapter-off reference.

NFT has no ratio: its `LossStats` carry `approx_kl` = mean (v_theta - v_old)^2 (how far the
update moved from the sampling policy), `clip_fraction` 0 and `ratio` 1.
"""

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_grpo.objectives.base import Advantages, LossInputs, LossStats, Objective, record_noise
from lit_grpo.objectives.flow_grpo import group_advantages


def optimality(advantages: Tensor, clip: float) -> Tensor:
    """DiffusionNFT's optimality probability r = 1/2 + 1/2 clip(A / clip, -1, 1), in [0, 1]."""
    return 0.5 + 0.5 * (advantages / clip).clamp(-1.0, 1.0)


def branch_loss(v: Tensor, target: Tensor, sigma: Tensor, adaptive: bool) -> Tensor:
    """The flow-matching error of one implicit policy, per image [n]: v, target
    [n, ...], sigma [n]. adaptive: the x0-space error sigma (v - target) (= x0_hat - x0 up
    to its sign), squared and divided by its detached mean absolute value (at least 1e-5);
    otherwise the mean squared velocity error."""
    return branch_elements(v, target, sigma, adaptive).flatten(1).mean(1)


def branch_elements(v: Tensor, target: Tensor, sigma: Tensor, adaptive: bool) -> Tensor:
    """`branch_loss` before its mean over each image's elements [n, ...] (the scale of the
    adaptive weighting is still the whole image's), for objectives that pool it by region."""
    if not adaptive:
        return (v - target) ** 2
    shape = (-1, *([1] * (v.ndim - 1)))
    err = sigma.view(shape) * (v - target)
    scale = err.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
    return err**2 / scale.view(shape)


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    target: Tensor,
    sigma: Tensor,
    r: Tensor,
    beta: float,
    adaptive: bool = True,
) -> Tensor:
    """( r l(v+) + (1 - r) l(v-) ) / beta per image [n] (module docstring): v the current
    velocity (with grad), v_old the sampling policy's (detached), target = noise - x0, all
    [n, ...]; sigma, r [n]."""
    v_old = v_old.detach()
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    pos = branch_loss(positive, target, sigma, adaptive)
    neg = branch_loss(negative, target, sigma, adaptive)
    return (r * pos + (1 - r) * neg) / beta


class DiffusionNFT(Objective):
    """DiffusionNFT's objective (see module docstring); it needs rollouts that record their
    noise levels (`ODETrajectory`, any steps) and no log-probability.

    Args:
        beta: the guidance strength between v_old and v_theta (the official code: 0.1;
            the paper's ablation ranges over 0.1 - 1).
        adv_clip: C, the advantage at which r saturates at 0 or 1 (the official code: 5).
        adv_std: "global" or "group" std of the group advantages.
        adaptive_weighting: the official code's self-normalised x0 error (True) or the
            paper's plain squared velocity error.
        kl_beta: weight of mean((v_theta - v_ref)^2) to the adapter-off reference (needs
            LoRA; the official code: 1e-4).
    """

    def __init__(
        self,
        beta: float = 0.1,
        adv_clip: float = 5.0,
        adv_std: str = "global",
        adaptive_weighting: bool = True,
        kl_beta: float = 0.0,
    ):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
        if adv_std not in ("group", "global"):
            raise ValueError(f"adv_std must be 'group' or 'global', got {adv_std!r}")
        self.beta, self.adv_clip, self.adv_std = beta, adv_clip, adv_std
        self.adaptive_weighting, self.kl_beta = adaptive_weighting, kl_beta
        self._record: weakref.ref | None = None  # the record the draws below belong to
        self._noise: Tensor | None = None  # [N, K, C, h, w]
        self._v_old: Tensor | None = None  # [N, K, C, h, w]

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        return group_advantages(rewards, group_size, std=self.adv_std, clamp=self.adv_clip)

    def terms(self, record) -> int:
        """One loss term per noise level: the record's trained steps."""
        return record.num_trained_steps

    def epoch_rows(self, record, minibatches: int, device, generator=None) -> Tensor:
        """The base's rows; first, the record's noise from `generator` (the module's: a
        resumed run draws the same)."""
        self.prepare(record, generator)
        return super().epoch_rows(record, minibatches, device, generator)

    def prepare(self, record, generator: torch.Generator | None = None) -> None:
        """Draw the noise [N, K, C, h, w] of a record not seen before (CPU `generator`, or
        the global RNG) and forget the previous record's v_old. Only a weak reference to
        the record is kept: it is freed with the step that made it."""
        if self._record is not None and self._record() is record:
            return
        self._noise = record_noise(record, record.num_trained_steps, generator)
        self._record, self._v_old = weakref.ref(record), None

    def draws(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """(noise, v_old) [N, K, C, h, w] of the whole record; v_old is taken on the first
        loss of the record's update (before any optimiser step: the sampling policy's)."""
        record, policy = inputs.record, inputs.policy
        self.prepare(record)
        if self._v_old is None:
            x0, olds = record.latents.float(), []
            with torch.no_grad():
                for k in range(record.num_trained_steps):
                    x_s = self.noised(x0, self._noise[:, k], record.sigmas[k])
                    sigma = record.sigmas[k].expand(len(record))
                    v = inputs.sampler.velocity(
                        policy, x_s.to(policy.latent_dtype), sigma, record.condition
                    )
                    olds.append(v.float())
            self._v_old = torch.stack(olds, 1)
        return self._noise, self._v_old

    def noised(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """x_sigma = (1 - sigma) x0 + sigma noise, in the policy's convention."""
        return (1 - sigma) * x0 + sigma * noise

    def forward(self, inputs: LossInputs) -> "NoisedTerm":
        """Term k's noised state of the rows' clean edits and the policy's velocity there
        (with grad), with the draws it was made from."""
        record, rows, k, policy = inputs.record, inputs.rows, inputs.k, inputs.policy
        noise, v_old = self.draws(inputs)
        x0, eps, old = record.latents[rows].float(), noise[rows, k], v_old[rows, k]
        sigma = record.sigmas[k]
        x_s = self.noised(x0, eps, sigma).to(policy.latent_dtype)
        sigma, cond = sigma.expand(x0.shape[0]), record.condition[rows]
        v = policy.velocity(x_s, sigma, cond).float()  # with grad
        return NoisedTerm(x0, eps, old, sigma, x_s, cond, v)

    def loss(self, inputs: LossInputs) -> tuple[Tensor, LossStats]:
        """NFT's loss at noise level k on the rows (+ kl_beta x the reference penalty)."""
        t = self.forward(inputs)
        r = optimality(inputs.targets.advantages[inputs.rows].float(), self.adv_clip)
        per_row = nft_loss(t.v, t.old, t.eps - t.x0, t.sigma, r, self.beta, self.adaptive_weighting)
        loss = inputs.per_row_sum(per_row)
        stats = t.stats(loss, inputs.weights)
        if self.kl_beta > 0:
            v_ref = t.reference_velocity(inputs.policy)
            kl = inputs.per_row_sum(((t.v - v_ref) ** 2).flatten(1).mean(1))
            loss = loss + self.kl_beta * kl
            stats.loss, stats.kl = loss.detach(), kl.detach()
        return loss, stats


@dataclass
class NoisedTerm:
    """One loss term of the rows: clean edits x0, noise eps, the sampling policy's velocity
    `old`, the level sigma [n], the noised state x_s, the conditions, the velocity v."""

    x0: Tensor
    eps: Tensor
    old: Tensor
    sigma: Tensor
    x_s: Tensor
    cond: Tensor
    v: Tensor

    def reference_velocity(self, policy) -> Tensor:
        """The reference's (adapter-off) velocity at x_s, no grad."""
        with torch.no_grad(), policy.reference():
            return policy.velocity(self.x_s, self.sigma, self.cond).float()

    def stats(self, loss: Tensor, weights: Tensor) -> LossStats:
        """NFT's `LossStats`: approx_kl = the valid rows' mean (v - v_old)^2, no clipping."""
        with torch.no_grad():
            moved = ((self.v - self.old) ** 2).flatten(1).mean(1)
            moved = (moved * weights).sum() / weights.sum().clamp_min(1)
        one = torch.ones((), device=loss.device)
        return LossStats(loss.detach(), moved, torch.zeros_like(one), one)
