"""The GRPO update: inner epochs x minibatches x trained steps over one rollout record.

For each minibatch of rows and each stored step k, the sampler rescores the recorded
transition under the current policy; the clipped ratio loss (plus beta x the KL to the
reference, the adapter-off view) is backpropagated per step, and the optimiser steps once
per minibatch after gradient clipping. `step_loss` is the one method a region method
overrides (per-token advantages and weights instead of per-rollout ones); two smaller hooks
sit inside it: `reduce` (per-element log-probs -> per sample: RC-GRPO's region mean) and
`epoch_rows` (the rows an inner epoch visits: Neighbor GRPO's anchors).

Degenerate minibatches never step: one whose rows are all masked (non-finite rewards,
zero-spread groups; on every rank) is skipped before its forward pass, since AdamW would
still move the weights on its zero gradient (momentum, weight decay); one whose loss or
gradient norm is not finite is zeroed and skipped, and counted (`nonfinite_skipped`).

The optimiser steps through `strategy.optimizer_step` (what `LightningOptimizer.step` runs,
precision plugin included) rather than `opt.step()`, so that Lightning's step counter does
not advance here: `trainer.global_step` counts GRPO iterations (`GRPOModule` advances it
once per training batch). The LR scheduler steps with every optimiser step.

Lightning's manual-optimisation hooks (`optimizers`, `manual_backward`, `clip_gradients`,
`block_backward_sync`) come from the module passed in; the update holds only its settings.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from lit_grpo.modules.objectives import clipped_policy_loss, kl_to_reference
from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler
from lit_grpo.sampling.sde import reduce_log_prob


@dataclass(frozen=True)
class PolicyTargets:
    """What the update trains towards, this rank's rows: advantages [N] (0 where not valid),
    valid [N] bool, and the loss denominator (valid rows of all ranks per minibatch and rank,
    so DDP's gradient average equals the single-process loss). Region methods add per-token
    advantages `tokens` [N, T] and the regions' token cover `cover` [N, R, T]."""

    advantages: Tensor
    valid: Tensor
    denominator: float
    tokens: Tensor | None = None
    cover: Tensor | None = None


class ClippedUpdate:
    """Flow-GRPO's policy update (see module docstring).

    Args:
        clip_range: PPO clip epsilon (Talk2Move: 2e-4).
        kl_beta: weight of the KL to the reference, on Flow-GRPO's scale (see `kl_to_reference`).
        inner_epochs, minibatches: passes over each rollout batch, and splits per pass.
        max_grad_norm: gradient clipping (L2 norm).
    """

    def __init__(
        self,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        inner_epochs: int = 1,
        minibatches: int = 1,
        max_grad_norm: float = 1.0,
    ):
        if inner_epochs < 1 or minibatches < 1:
            raise ValueError(
                f"inner_epochs and minibatches must be >= 1, got {inner_epochs}, {minibatches}"
            )
        self.clip_range, self.kl_beta = clip_range, kl_beta
        self.inner_epochs, self.minibatches = inner_epochs, minibatches
        self.max_grad_norm = max_grad_norm

    def __call__(
        self,
        module: L.LightningModule,
        sampler: RolloutSampler,
        record: RolloutRecord,
        targets: PolicyTargets,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Train on `record`; `generator` (CPU) draws the minibatch order (None: global RNG)."""
        opt, sched = module.optimizers(), module.lr_schedulers()
        num_steps = record.num_trained_steps
        totals = dict.fromkeys(("loss", "approx_kl", "clip_fraction", "ratio", "kl"), 0.0)
        count, norms, nonfinite, empty = 0, [], 0, 0
        strategy = module.trainer.strategy
        sync_block = getattr(strategy, "block_backward_sync", nullcontext)
        for _ in range(self.inner_epochs):
            rows = self.epoch_rows(record, targets, module.device, generator)
            chunks = rows.chunk(self.minibatches)
            # valid rows per minibatch summed over ranks (all ranks must skip together, or
            # DDP's all-reduce hangs): one host sync per pass, none per step
            live = torch.stack([targets.valid[rows].sum() for rows in chunks])
            live = strategy.reduce(live.float(), reduce_op="sum").tolist()
            for rows, n_live in zip(chunks, live):
                if n_live == 0:
                    empty += 1
                    continue
                opt.zero_grad(set_to_none=True)
                finite = True
                for k in range(num_steps):
                    # all-reduce the gradients once per minibatch, on its last step
                    with sync_block() if k < num_steps - 1 else nullcontext():
                        loss, stats = self.step_loss(module, sampler, record, targets, rows, k)
                        module.manual_backward(loss / num_steps)
                    values = {key: v.item() for key, v in stats.items()}  # not in a graph
                    for key, value in values.items():
                        totals[key] += value
                    finite = finite and math.isfinite(values["loss"])
                    count += 1
                # the norm of the whole gradient (after DDP's all-reduce; over every shard
                # under FSDP), the same on every rank; whether to skip is decided by all ranks
                # together: a rank that stepped alone would wait forever in the next collective
                norm = _grad_norm(module)
                if _any_rank(strategy, not (finite and math.isfinite(norm)), module.device):
                    opt.zero_grad(set_to_none=True)
                    nonfinite += 1
                    continue
                norms.append(norm)
                module.clip_gradients(
                    opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                )
                with module.trainer.profiler.profile("optimizer_step"):
                    strategy.optimizer_step(opt.optimizer, closure=_no_closure)
                sched.step()
        out = {k: v / max(count, 1) for k, v in totals.items()}
        out["grad_norm"] = sum(norms) / max(len(norms), 1)
        out["optimizer_steps"] = float(len(norms))
        out["nonfinite_skipped"] = float(nonfinite)
        out["empty_minibatches"] = float(empty)
        return out

    def epoch_rows(
        self,
        record: RolloutRecord,
        targets: PolicyTargets,
        device,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The rows one inner epoch trains, in order (shuffled by the CPU `generator` when
        split in minibatches)."""
        n = len(record)
        if self.minibatches > 1:
            return torch.randperm(n, generator=generator).to(device)
        return torch.arange(n, device=device)

    def reduce(self, elements: Tensor, record: RolloutRecord, rows: Tensor) -> Tensor:
        """Per-element log-probs [n, C, h, w] of `rows` -> per-sample [n]: Flow-GRPO's mean
        over every element here; region methods weight the elements."""
        return reduce_log_prob(elements, "mean")

    def step_loss(
        self,
        module: L.LightningModule,
        sampler: RolloutSampler,
        record: RolloutRecord,
        targets: PolicyTargets,
        rows: Tensor,
        k: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of stored step k on `rows` (with grad) and its statistics."""
        step = sampler.rescore(module.policy, record, rows, k)
        log_prob = self.reduce(step.log_prob, record, rows)  # [n]
        old = self.reduce(record.log_prob_elements[rows, k], record, rows)  # [n]
        weights = targets.valid[rows].float()
        loss, s = clipped_policy_loss(
            log_prob, old, targets.advantages[rows], self.clip_range, weights, targets.denominator
        )
        stats = {
            "loss": loss.detach(),
            "approx_kl": s.approx_kl,
            "clip_fraction": s.clip_fraction,
            "ratio": s.ratio_mean,
        }
        return self.add_kl(module, sampler, record, targets, rows, k, step, loss, stats)

    def add_kl(self, module, sampler, record, targets, rows, k, step, loss, stats):
        """`loss` plus beta x the KL of stored step k's means to the reference's (the
        adapter-off view), per sample, over the valid rows, on the loss's denominator."""
        if self.kl_beta <= 0:
            return loss, stats
        with torch.no_grad(), module.policy.reference():
            ref = sampler.rescore(module.policy, record, rows, k)
        kl = kl_to_reference(step.mean, ref.mean, step.diffusion)  # [n]
        kl = (kl * targets.valid[rows].float()).sum() / targets.denominator
        loss = loss + self.kl_beta * kl
        stats["loss"] = loss.detach()
        stats["kl"] = kl.detach()
        return loss, stats


def _no_closure() -> None:
    """The closure `strategy.optimizer_step` wants: the backward passes already ran."""


def _grad_norm(module: L.LightningModule) -> float:
    """The L2 norm of every gradient. Under FSDP2 a gradient is a DTensor and each rank
    holds a shard of it: the shards' squared norms are summed over their mesh, so every rank
    gets the norm of the whole gradient (a collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    plain = [g.float().norm() ** 2 for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    square = torch.stack(plain).sum() if plain else torch.zeros((), device=module.device)
    if sharded:
        mesh = sharded[0].device_mesh
        if any(not p.is_shard() for g in sharded for p in g.placements):
            raise NotImplementedError("gradient norm of a replicated DTensor: not used here")
        local = torch.stack([g.to_local().float().norm() ** 2 for g in sharded]).sum()
        torch.distributed.all_reduce(local, group=mesh.get_group())
        square = square + local.to(square.device)
    return square.sqrt().item()


def _any_rank(strategy, flag: bool, device) -> bool:
    """`flag` of any rank (a max over ranks; the flag itself on one process)."""
    value = torch.tensor(float(flag), device=device)
    return bool(strategy.reduce(value, reduce_op="max").item() > 0)
