"""The update loop of every objective: inner epochs x minibatches x loss terms over one
rollout record, micro-batched, skips decided on the device.

The loop is the same for every paper; what differs is the `lit_grpo.objectives.Objective`
it is handed: which rows an inner epoch visits (`epoch_rows`: Neighbor GRPO's anchors), how
many loss terms a row has (`terms`: the record's trained steps), and the loss of one term
on some rows (`loss(LossInputs)` -> loss with grad, `LossStats`). The optimiser steps once
per minibatch after gradient clipping.

Memory: with `micro_batch_size` a minibatch's forward and backward passes run on at most
that many rows at a time and the gradients accumulate. Every loss is a sum over rows
divided by a denominator fixed before the update (`PolicyTargets.denominator`), so the
micro-batches' losses add up to the minibatch's loss and the accumulated gradient is the
full-batch one, with no rescaling.

No host syncs: nothing inside the update reads a value back from the device. Degenerate
minibatches are decided on the device and never step: one whose rows are all masked
(non-finite rewards, zero-spread groups; on every rank), since AdamW would still move the
weights on its zero gradient (momentum, weight decay), and one whose loss or gradient norm
is not finite on any rank (counted, `nonfinite_skipped`). The skip is the fused AdamW's own
(the `found_inf` flag the kernel honours, as under a `GradScaler`), so such a minibatch
still runs its forward and backward passes (with weights 0) and the LR schedule still
steps: deciding on the host would drain the GPU's queue once per minibatch. An optimiser
without device-side skipping falls back to reading the flag on the host. The statistics
come back as device tensors, read when they are logged. An iteration with no valid row at
all never gets here: `GRPOModule.training_step` skips its update (one host read per
iteration, made on gathered data, so every rank skips together).

Under DDP and FSDP2 the decisions are the same on every rank: the valid-row counts are
summed over ranks and the finite flags combined by a min over ranks (device-side
all-reduces), and the gradient norm is that of the whole gradient (DDP's all-reduced one;
under FSDP2 the DTensor shards' squared norms summed over the mesh), so clipping scales
every shard by the same factor.

The optimiser steps through `strategy.optimizer_step` (what `LightningOptimizer.step` runs,
precision plugin included) rather than `opt.step()`, so that Lightning's step counter does
not advance here: `trainer.global_step` counts GRPO iterations (`GRPOModule` advances it
once per training batch). The LR scheduler steps with every optimiser step the update
attempts, those skipped on the device included.

Lightning's manual-optimisation hooks (`optimizers`, `manual_backward`,
`block_backward_sync`) come from the module passed in; the loop holds only its settings.
Gradients are clipped with `torch.nn.utils.clip_grads_with_norm_` and the norm the skip
decision already took (Lightning's `clip_gradients` refuses a fused optimiser under mixed
precision; under FSDP2 the 0-d clip factor multiplies the DTensor shards as a replicated
scalar); fp16 with loss scaling is refused (bf16 and fp32 are what the update supports).
"""

from contextlib import nullcontext

import lightning as L
import torch
from torch import Tensor
from torch.nn.utils import clip_grads_with_norm_

from lit_grpo.objectives.base import LossInputs, LossStats, Objective, PolicyTargets
from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler


class UpdateLoop:
    """The policy update of every objective (see module docstring).

    Args:
        inner_epochs, minibatches: passes over each rollout batch, and splits per pass.
        max_grad_norm: gradient clipping (L2 norm).
        micro_batch_size: the most rows one forward and backward pass sees (None: the whole
            minibatch); the gradient is the same, the activation memory scales with it.
    """

    def __init__(
        self,
        inner_epochs: int = 1,
        minibatches: int = 1,
        max_grad_norm: float = 1.0,
        micro_batch_size: int | None = None,
    ):
        if inner_epochs < 1 or minibatches < 1:
            raise ValueError(
                f"inner_epochs and minibatches must be >= 1, got {inner_epochs}, {minibatches}"
            )
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 (or None), got {micro_batch_size}")
        self.inner_epochs, self.minibatches = inner_epochs, minibatches
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size

    def __call__(
        self,
        module: L.LightningModule,
        objective: Objective,
        sampler: RolloutSampler,
        record: RolloutRecord,
        targets: PolicyTargets,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Train `objective` on `record`; `generator` (CPU) draws the minibatch order (None:
        global RNG). Returns the statistics as 0-d device tensors (read them when logging)."""
        opt, sched = module.optimizers(), module.lr_schedulers()
        strategy = module.trainer.strategy
        if getattr(strategy.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "the GRPO update does not support fp16 loss scaling (trainer.precision "
                f"{module.trainer.precision!r}); use precision bf16-mixed, bf16-true or 32"
            )
        zero = torch.zeros((), device=module.device)
        totals = dict.fromkeys(LossStats.keys(), zero)
        count, norms, taken, nonfinite, empty = zero, zero, zero, zero, zero
        terms = objective.terms(record)
        for _ in range(self.inner_epochs):
            rows = objective.epoch_rows(record, self.minibatches, module.device, generator)
            chunks = rows.chunk(self.minibatches)
            # valid rows per minibatch summed over ranks (a collective, not a host read): all
            # ranks skip the same minibatches, or DDP's next all-reduce would hang
            live = torch.stack([targets.valid[rows].sum() for rows in chunks]).float()
            live = _all_reduce(live, "sum") > 0
            for rows, has_rows in zip(chunks, live):
                opt.zero_grad(set_to_none=True)
                inputs = LossInputs(module.policy, sampler, record, targets, rows, 0)
                stats, finite = self.minibatch_backward(module, objective, inputs, terms)
                for key, value in stats.items():
                    totals[key] = totals[key] + torch.where(has_rows, value, 0.0)
                count = count + has_rows * terms
                # the norm of the whole gradient (after DDP's all-reduce; over every shard
                # under FSDP2), the same on every rank. Whether to skip is decided by all
                # ranks together (a min over ranks, on the device): a rank that stepped alone
                # would wait forever in the next collective
                norm = _grad_norm(module)
                finite = _on_every_rank(finite & torch.isfinite(norm))
                step = has_rows & finite
                # clipped with the norm just taken (Lightning's `clip_gradients` refuses a
                # fused optimiser under mixed precision, for fp16's loss scaling)
                clip_grads_with_norm_(
                    [p for p in module.parameters() if p.grad is not None],
                    self.max_grad_norm,
                    norm,
                )
                with module.trainer.profiler.profile("optimizer_step"):
                    _step_where(strategy, opt, step)
                sched.step()
                norms = norms + torch.where(step, norm, 0.0)
                taken = taken + step
                nonfinite = nonfinite + (has_rows & ~finite)
                empty = empty + ~has_rows
        out = {k: v / count.clamp_min(1) for k, v in totals.items()}
        out["grad_norm"] = norms / taken.clamp_min(1)
        out["optimizer_steps"] = taken.float()
        out["nonfinite_skipped"] = nonfinite.float()
        out["empty_minibatches"] = empty.float()
        return out

    def minibatch_backward(
        self, module: L.LightningModule, objective: Objective, minibatch: LossInputs, terms: int
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Backpropagate the loss of `minibatch.rows` for every loss term, `micro_batch_size`
        rows per pass. Returns the statistics summed over the terms (device tensors) and
        whether every loss was finite (a 0-d bool tensor)."""
        rows, targets = minibatch.rows, minibatch.targets
        micro = rows.split(self.micro_batch_size or max(rows.numel(), 1))
        passes = [(part, k) for part in micro for k in range(terms)]
        sync_block = getattr(module.trainer.strategy, "block_backward_sync", nullcontext)
        valid = targets.valid.float()
        share_of = valid[rows].sum().clamp_min(1)
        totals: dict[str, Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=rows.device)
        for i, (part, k) in enumerate(passes):
            # all-reduce the gradients once per minibatch, on its last backward pass
            with sync_block() if i < len(passes) - 1 else nullcontext():
                inputs = LossInputs(
                    minibatch.policy, minibatch.sampler, minibatch.record, targets, part, k
                )
                loss, stats = objective.loss(inputs)
                module.manual_backward(loss / terms)
            share = valid[part].sum() / share_of  # mean statistics: weighted by valid rows
            for key, value in stats.as_dict().items():  # detached: not in a graph
                value = value if key in LossStats.ADDITIVE else value * share
                totals[key] = totals.get(key, 0.0) + value
            finite = finite & torch.isfinite(stats.loss)
        return totals, finite


def adamw_with_warmup(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser the loop steps and its LR schedule: AdamW, fused where every parameter
    is on a CUDA or CPU device, with a linear warm-up over `warmup_steps` optimiser steps
    (the LR scheduler steps with every step the loop attempts, skipped ones included)."""
    # fused: one kernel for all parameters, and it can skip a step on the device (the
    # degenerate minibatches, `_step_where`) without reading a flag back to the host
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    warmup = max(warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return opt, sched


def _no_closure() -> None:
    """The closure `strategy.optimizer_step` wants: the backward passes already ran."""


def _step_where(strategy, opt, step: Tensor) -> None:
    """Step the optimiser where the 0-d bool `step` is True, deciding on the device: the
    fused Adam(W) kernels skip a step, their step counter included, when the optimiser's
    `found_inf` is set (the flag `torch.amp.GradScaler` hands them). Any other optimiser
    reads `step` on the host (one sync per optimiser step)."""
    raw = opt.optimizer
    # torch has no public way to skip a fused step on the device: `found_inf` is the
    # attribute `torch.amp.GradScaler` hands the fused kernels, which advertise taking it
    # with `_step_supports_amp_scaling`; the alternative is one host sync per minibatch
    if getattr(raw, "_step_supports_amp_scaling", False):
        raw.found_inf = (~step).float()
        try:
            strategy.optimizer_step(raw, closure=_no_closure)
        finally:
            del raw.found_inf
    elif bool(step):
        strategy.optimizer_step(raw, closure=_no_closure)


def _grad_norm(module: L.LightningModule) -> Tensor:
    """The L2 norm of every gradient, a 0-d device tensor (not read back). Under FSDP2 a
    gradient is a DTensor and each rank holds a shard of it: the shards' squared norms are
    summed over their mesh, so every rank gets the norm of the whole gradient (a
    collective: all ranks call it)."""
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
    return square.sqrt()


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    """`tensor` reduced over all ranks with `op` ("sum", "min"); the tensor itself on one
    process. A plain `all_reduce`, queued on the device like any kernel: Lightning's
    `strategy.reduce` puts a barrier first, which on NCCL makes the host wait for the GPU."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def _on_every_rank(flag: Tensor) -> Tensor:
    """Whether the 0-d bool `flag` holds on every rank (a 0-d bool device tensor)."""
    return _all_reduce(flag.to(torch.int32), "min") > 0
