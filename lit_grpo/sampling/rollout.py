"""The rollout sampler: G rollouts per condition, recorded for the policy gradient.

    condition = policy.encode_condition(source, instruction)      once per condition, x G
    x_T       = noise.initial(...)                                 the noise builder's
    for step i of the strategy's plan:
        v = policy.velocity(x_i, sigma_i, condition)
        i == exit step  -> x_0 = x_i - sigma_i * v                 (early exit, Talk2Move)
        i an SDE step   -> x_i+1 ~ N(mean, std^2), log p recorded  (Flow-GRPO; noise.step(...))
        otherwise       -> x_i+1 = x_i + (sigma_i+1 - sigma_i) v   (ODE; recorded if trained,
                                                                    Neighbor GRPO's steps)
    images = policy.decode_to(x_0, source size)

The trajectory is kept in float32 (the network sees it in the policy's latent dtype), so
the stored transitions are exactly the ones the old log-probabilities scored. Log-probs are
stored per element ([N, K, C, h, w]); `RolloutRecord.log_probs("mean")` is Flow-GRPO's
per-sample mean, and region methods weight the elements themselves. `rescore` recomputes a
stored step under the current (or the reference) policy: the other half of the ratio.

Memory and speed: with `micro_batch_size` the network sees at most that many rows at a time
(every `velocity` call and the decoding run in chunks of the N = B x G rows), while the
noise and the SDE maths still run over all N rows at once, so the rollouts are the same
as without it. Nothing in the loop reads a value back to the host (no `.item()`, no branch
on a tensor): the GPU's queue is never drained inside a rollout. The plan is checked
against the schedule in Python before the loop instead.
"""

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lit_grpo.sampling.flow import ode_step, shortcut_to_data, sigma_schedule
from lit_grpo.sampling.noise import IndependentNoise, NoiseBuilder
from lit_grpo.sampling.sde import SDEStep, reduce_log_prob, sde_step
from lit_grpo.sampling.strategies import SamplingPlan

if TYPE_CHECKING:  # sampling sits below policies: it knows the EditPolicy contract, not the code
    from lit_grpo.policies.base import Condition, EditPolicy


@dataclass(frozen=True)
class RolloutRecord:
    """G rollouts for each of B conditions, N = B * G rows (a group's rows are contiguous).

    condition:   the encoded condition, repeated per rollout (N rows)
    states:      [N, K, C, h, w] float32 latents entering each trained step
    next_states: [N, K, C, h, w] float32 latents those steps sampled (SDE) or reached (ODE)
    log_prob_elements: [N, K, C, h, w] float32 per-element log-probabilities (old policy) of
                 trained SDE steps; None when the trained steps are ODE steps (a plan trains
                 one kind: Neighbor GRPO trains ODE steps and scores them by distances)
    train_steps: the K schedule indices of the trained steps
    sigmas:      [K] noise level of each trained step; sigma_next: [K] the level after it
    sigma_max:   the schedule's second sigma (the SDE std's denominator at sigma = 1)
    latents:     [N, C, h, w] the final latents;  images: [N, 3, H, W] decoded, in [0, 1],
                 at the source's size
    attention:   [N, L, rows, cols] instruction-to-image attention averaged over the
                 sampled steps (None unless asked for)
    regions:     [N, h, w] the edit regions the noise builder was given (None if none)
    """

    condition: "Condition"
    states: Tensor
    next_states: Tensor
    log_prob_elements: Tensor
    train_steps: tuple[int, ...]
    sigmas: Tensor
    sigma_next: Tensor
    sigma_max: Tensor
    latents: Tensor
    images: Tensor
    group_size: int
    attention: Tensor | None = None
    regions: Tensor | None = None

    def __len__(self) -> int:
        return self.states.shape[0]

    @classmethod
    def cat(cls, records: list["RolloutRecord"]) -> "RolloutRecord":
        """The records of consecutive chunks of conditions, as one record (rows in order);
        they share the plan, the schedule and the group size."""
        if len(records) == 1:
            return records[0]

        def rows(values):  # [n_i, ...] tensors (or all None) -> [sum n_i, ...]
            return None if values[0] is None else torch.cat(values)

        first, shared = records[0], ("train_steps", "sigmas", "sigma_next", "sigma_max")
        joined = {
            f.name: rows([getattr(r, f.name) for r in records])
            for f in fields(cls)
            if f.name not in ("condition", "group_size", *shared)
        }
        condition = replace(
            first.condition,
            **{
                f.name: rows([getattr(r.condition, f.name) for r in records])
                for f in fields(first.condition)
            },
        )
        return replace(first, condition=condition, **joined)

    @property
    def num_trained_steps(self) -> int:
        return self.states.shape[1]

    def log_probs(self, reduction: str = "mean") -> Tensor:
        """[N, K] per-sample log-probs ("mean": Flow-GRPO's, "sum": the joint density) or the
        per-element [N, K, C, h, w] ("none")."""
        if reduction == "none":
            return self.log_prob_elements
        # step by step, the reduction an SDE step applies: the same numbers, bit for bit
        steps = range(self.num_trained_steps)
        return torch.stack([self.step_log_prob(k, reduction) for k in steps], 1)

    def step_log_prob(self, k: int, reduction: str = "mean", rows: Tensor | None = None) -> Tensor:
        """Old log-probs of trained step k: [n] reduced, or per element ("none")."""
        elements = self.log_prob_elements[:, k] if rows is None else self.log_prob_elements[rows, k]
        return reduce_log_prob(elements, reduction)


class RolloutSampler:
    """Runs a sampling plan for groups of rollouts and records them (see module docstring).

    Args:
        steps, shift: the denoising schedule (`sigma_schedule`).
        noise_level: the SDE noise level a (Talk2Move: 1.0).
        noise: where the randomness comes from (`IndependentNoise` by default).
        micro_batch_size: the most rows one `velocity` or `decode` call sees (None: all N);
            the memory of the rollout phase scales with it, the result does not.
    """

    def __init__(
        self,
        steps: int = 10,
        shift: float = 1.0,
        noise_level: float = 1.0,
        noise: NoiseBuilder | None = None,
        micro_batch_size: int | None = None,
    ):
        sigma_schedule(steps, shift)  # bad values fail here, at construction
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 (or None), got {micro_batch_size}")
        self.steps, self.shift, self.noise_level = steps, shift, noise_level
        self.noise = noise or IndependentNoise()
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def __call__(
        self,
        policy: "EditPolicy",
        source: Tensor,
        instructions: list[str],
        group_size: int,
        plan: SamplingPlan,
        generator: torch.Generator | None = None,
        attention: bool = False,
        regions: Tensor | None = None,
        keys: list[str] | None = None,
    ) -> RolloutRecord:
        """Roll out `group_size` edits of each (source [B, 3, H, W], instruction); `keys`
        name the sources for the policy's caches (`EditPolicy.encode_condition`)."""
        if not plan.train_steps:
            raise ValueError("the sampling plan trains no step: nothing to record")
        sde_trained = [k in plan.sde_steps for k in plan.train_steps]
        if any(sde_trained) and not all(sde_trained):
            raise ValueError(
                f"the plan trains SDE and ODE steps together ({plan.train_steps}, SDE steps "
                f"{plan.sde_steps}); a policy objective takes one kind: train either only SDE "
                "steps (log-probabilities) or only ODE steps (Neighbor GRPO's distances)"
            )
        run = range(self.steps if plan.exit_step is None else plan.exit_step)
        if any(i in plan.sde_steps and i == self.steps - 1 for i in run):
            raise ValueError(
                f"the plan samples the last step ({self.steps - 1}) with the SDE; its target "
                "sigma is 0 and the Gaussian degenerate: end the plan's SDE steps before it"
            )
        g = group_size
        cond = policy.encode_condition(source, instructions, keys).repeat_interleave(g)
        n, size = source.shape[0] * g, tuple(source.shape[-2:])
        shape = (n, *policy.latent_shape(size))
        dtype = policy.latent_dtype
        like = torch.empty(shape, dtype=dtype, device=source.device)
        x = self.noise.initial(like, g, generator, regions).float()
        sigmas = sigma_schedule(self.steps, self.shift, source.device)
        states, nexts, logps = [], [], []
        with policy.capture_attention(attention) as maps:
            for i in range(self.steps):
                v = self.velocity(policy, x.to(dtype), sigmas[i].expand(n), cond)
                if i == plan.exit_step:  # early exit: jump from sigma_i straight to the data
                    x = shortcut_to_data(x, v.float(), sigmas[i])
                    break
                if i in plan.sde_steps:
                    eps = self.noise.step(x, g, i, generator, regions)
                    step = self._step(x, v, sigmas[i], sigmas[i + 1], sigmas[1], noise=eps)
                    if i in plan.train_steps:
                        states.append(x)
                        nexts.append(step.sample)
                        logps.append(step.log_prob)
                    x = step.sample
                else:
                    x_next = ode_step(x, v.float(), sigmas[i], sigmas[i + 1])
                    if i in plan.train_steps:  # a trained ODE step (Neighbor GRPO): no log-prob
                        states.append(x)
                        nexts.append(x_next)
                    x = x_next
        latents = x.to(dtype)
        return RolloutRecord(
            condition=cond,
            states=torch.stack(states, 1),
            next_states=torch.stack(nexts, 1),
            log_prob_elements=torch.stack(logps, 1) if logps else None,
            train_steps=tuple(plan.train_steps),
            # indexed with Python ints: a device index tensor would be a host-to-device copy
            sigmas=torch.stack([sigmas[k] for k in plan.train_steps]),
            sigma_next=torch.stack([sigmas[k + 1] for k in plan.train_steps]),
            sigma_max=sigmas[1],
            latents=latents,
            # at the source's size, where rewards, metrics and masks live (a backbone may
            # edit at a preferred size of its own: `EditPolicy.edit_size`)
            images=torch.cat([policy.decode_to(c, size) for c in self._chunks(latents)]),
            group_size=g,
            attention=self._mean_attention(maps, n) if attention else None,
            regions=regions,
        )

    def velocity(self, policy: "EditPolicy", x: Tensor, sigma: Tensor, cond: "Condition") -> Tensor:
        """`policy.velocity` over all rows of x [N, C, h, w], `micro_batch_size` rows a call."""
        if self.micro_batch_size is None or x.shape[0] <= self.micro_batch_size:
            return policy.velocity(x, sigma, cond)
        parts = [
            policy.velocity(x[rows], sigma[rows], cond[rows])
            for rows in self._row_slices(x.shape[0])
        ]
        return torch.cat(parts)

    def _row_slices(self, n: int) -> list[slice]:
        m = self.micro_batch_size or n
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    def _chunks(self, x: Tensor) -> list[Tensor]:
        return [x[rows] for rows in self._row_slices(x.shape[0])]

    def _mean_attention(self, maps: list[Tensor], n: int) -> Tensor:
        """[N, L, rows, cols]: the captured maps (one per velocity call, so one per chunk of a
        step) joined per step and averaged over the steps."""
        chunks = len(self._row_slices(n))
        steps = [torch.cat(maps[i : i + chunks]) for i in range(0, len(maps), chunks)]
        return torch.stack(steps).mean(0)

    def rescore(self, policy: "EditPolicy", record: RolloutRecord, rows: Tensor, k: int) -> SDEStep:
        """Stored step k of `rows` under `policy` as it is now (with grad, unless the caller
        disables it): per-element log-prob of the recorded transition, mean and std. The
        update calls it per micro-batch of rows, so it is not chunked here."""
        x = record.states[rows, k]
        sigma = record.sigmas[k].expand(x.shape[0])
        v = policy.velocity(x.to(policy.latent_dtype), sigma, record.condition[rows])
        return self._step(
            x,
            v,
            record.sigmas[k],
            record.sigma_next[k],
            record.sigma_max,
            prev_sample=record.next_states[rows, k],
        )

    def _step(self, x, v, sigma, sigma_next, sigma_max, **kwargs) -> SDEStep:
        return sde_step(
            x,
            v,
            sigma,
            sigma_next,
            self.noise_level,
            sigma_max=sigma_max,
            reduction="none",
            validate=False,  # the plan was checked against the schedule (no host sync)
            **kwargs,
        )
