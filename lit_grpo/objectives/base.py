"""The objective contract: what the update loop hands a loss, and what it gets back.

An objective is one paper's policy loss and its advantages, as pure torch (no Lightning):

- `advantages(scores, group_size, ranks, policy)` -> (Advantages of every rank, this rank's
  `PolicyTargets`): rewards gathered over ranks, then the paper's normalisation;
- `epoch_rows(record, minibatches, device, generator)` -> the rows one inner epoch trains;
- `terms(record)` -> loss terms per row (Flow-GRPO: the record's trained steps);
- `loss(inputs)` -> (the loss of one term on some rows, with grad; its `LossStats`).

`LossInputs` carries what a loss needs: the policy, the sampler that made the record (to
rescore a stored step), the record, the targets, the rows and the term's index. Nothing
here assumes per-step log-probabilities: a likelihood-free objective (DiffusionNFT: a
flow-matching loss on re-noised clean images) reads `record.images` / `record.x0`, draws
its own noise levels in `loss`, and sets `terms` to the noise levels per image.

Every loss is a sum over rows divided by `targets.denominator` (fixed before the update),
so the loop's micro-batches add up to the minibatch's loss and gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lit_grpo.sampling.flow import host_to_device

if TYPE_CHECKING:
    from lit_grpo.policies.base import EditPolicy
    from lit_grpo.rewards.scoring import Scores
    from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler
    from lit_grpo.sampling.sde import SDEStep


@dataclass
class Advantages:
    """values: [B * G] advantages (0 in skipped groups); zero_spread: [B] groups with no
    reward spread (they carry no signal and are skipped); valid: [B * G] rollouts that count."""

    values: Tensor
    zero_spread: Tensor
    valid: Tensor


@dataclass(frozen=True)
class PolicyTargets:
    """What the update trains towards, this rank's rows: advantages [N] (0 where not valid),
    valid [N] bool, and the loss denominator (valid rows of all ranks per minibatch and rank,
    so DDP's gradient average equals the single-process loss; set by the module). Region
    objectives add per-region advantages `regions` [N, R] (0 where not valid) and the
    regions' token cover `cover` [N, R, T]."""

    advantages: Tensor
    valid: Tensor
    denominator: Tensor | float = 1.0
    regions: Tensor | None = None
    cover: Tensor | None = None


@dataclass(frozen=True)
class Ranks:
    """The data-parallel view an objective's advantages need: `gather(t)` stacks every
    rank's `t` ([world, ...]; `t` itself when alone), `rank` is this one's index."""

    gather: Callable[[Tensor], Tensor]
    rank: int = 0


ALONE = Ranks(lambda t: t, 0)


@dataclass(frozen=True)
class LossInputs:
    """One loss term's inputs: term `k` (a stored step of the record for the likelihood
    objectives) on `rows` [n] of `record`, trained towards `targets`."""

    policy: EditPolicy
    sampler: RolloutSampler
    record: RolloutRecord
    targets: PolicyTargets
    rows: Tensor
    k: int

    def rescore(self) -> SDEStep:
        """Stored step k of `rows` under the current policy (with grad)."""
        return self.sampler.rescore(self.policy, self.record, self.rows, self.k)

    def rescore_reference(self) -> SDEStep:
        """Stored step k of `rows` under the reference (the adapter-off view), no grad."""
        with torch.no_grad(), self.policy.reference():
            return self.rescore()

    @property
    def weights(self) -> Tensor:
        """[n] float: 1 on the rows that train, 0 on the masked ones."""
        return self.targets.valid[self.rows].float()

    def per_row_sum(self, per_row: Tensor) -> Tensor:
        """sum over the valid rows of `per_row` [n], on the loss's denominator."""
        return (per_row * self.weights).sum() / self.targets.denominator


@dataclass
class LossStats:
    """The statistics of one loss term (detached 0-d tensors), logged as `train/<field>`.
    `loss`, `kl` and `hold` (the scene hold, `scene_hold.py`) are sums over rows on the fixed
    denominator: they add up over micro-batches; the others are means over rows, combined
    weighted by valid rows."""

    loss: Tensor
    approx_kl: Tensor
    clip_fraction: Tensor
    ratio: Tensor
    kl: Tensor | None = None
    hold: Tensor | None = None

    ADDITIVE: ClassVar[tuple[str, ...]] = ("loss", "kl", "hold")

    def as_dict(self) -> dict[str, Tensor]:
        """{field: value} of the fields set, detached."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v.detach() for k, v in out.items() if v is not None}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class Objective:
    """The base every objective extends (see module docstring). Subclasses set `normalise`
    (their advantages) and `loss`; `kl_beta` or `hold_beta` > 0 means `loss` forwards the
    reference (the module then needs a LoRA adapter)."""

    kl_beta: float = 0.0
    hold_beta: float = 0.0

    @property
    def uses_reference(self) -> bool:
        """Whether `loss` forwards the reference, the adapter-off view (the KL or the scene
        hold): the module then needs a LoRA adapter."""
        return self.kl_beta > 0 or self.hold_beta > 0

    def check_rewards(self, rewards: list) -> None:
        """Refuse, at construction, rewards this objective cannot train on (none here)."""

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        """Advantages of the gathered rewards [B * G]."""
        raise NotImplementedError

    def advantages(
        self, scores: Scores, group_size: int, ranks: Ranks, policy: EditPolicy
    ) -> tuple[Advantages, PolicyTargets]:
        """`normalise` of the total rewards of every rank, and this rank's targets."""
        adv, values, valid = gathered_advantages(scores.total, group_size, ranks, self.normalise)
        return adv, PolicyTargets(values, valid)

    def epoch_rows(
        self,
        record: RolloutRecord,
        minibatches: int,
        device,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The rows one inner epoch trains, in order (shuffled by the CPU `generator` when
        split in minibatches)."""
        n = len(record)
        if minibatches > 1:
            return host_to_device(torch.randperm(n, generator=generator), device)
        return torch.arange(n, device=device)

    def terms(self, record: RolloutRecord) -> int:
        """Loss terms per row: the record's trained steps."""
        return record.num_trained_steps

    def loss(self, inputs: LossInputs) -> tuple[Tensor, LossStats]:
        raise NotImplementedError


def record_noise(record: RolloutRecord, terms: int, generator=None) -> Tensor:
    """Standard normal noise [N, terms, C, h, w] for re-noising a record's clean latents,
    drawn on the CPU (`generator`, or the global RNG: a resumed run draws the same) and
    copied to the record's device without a sync (DiffusionNFT's levels, the scene hold)."""
    x0 = record.latents
    noise = torch.randn((len(record), terms, *x0.shape[1:]), generator=generator)
    return host_to_device(noise, x0.device)


def gathered_advantages(
    local_rewards: Tensor, group_size: int, ranks: Ranks, normalise, **kwargs
) -> tuple[Advantages, Tensor, Tensor]:
    """Advantages computed on the rewards of every rank, sliced back to this rank.

    Every rank normalises the same numbers (`ranks.gather`, e.g. Lightning's `all_gather`),
    so a "global" std and the skip decisions agree across ranks and with a single process.
    Ranks hold whole groups (a condition's G rollouts never straddle ranks). `normalise` is
    the objective's normalisation (`group_advantages`, `quasi_norm_advantages`, ...).
    Returns (advantages of all ranks, this rank's values [N], this rank's valid mask [N]).
    """
    gathered = ranks.gather(local_rewards)
    adv = normalise(gathered.reshape(-1), group_size, **kwargs)
    n = local_rewards.shape[0]
    r = ranks.rank if gathered.ndim > local_rewards.ndim else 0
    return adv, adv.values[r * n : (r + 1) * n], adv.valid[r * n : (r + 1) * n]
