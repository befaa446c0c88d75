"""The rollout sampler: G rollouts per condition, recorded for the policy gradient.

    condition = policy.encode_condition(source, instruction)      once per condition, x G
    x_T       = noise.initial(...)                                 the noise builder's
    for step i of the strategy's plan:
        v = policy.velocity(x_i, sigma_i, condition)
        i == exit step  -> x_0 = x_i - sigma_i * v                 (early exit, Talk2Move)
        i an SDE step   -> x_i+1 ~ N(mean, std^2), log p recorded  (Flow-GRPO; noise.step(...))
        otherwise       -> x_i+1 = x_i + (sigma_i+1 - sigma_i) v   (ODE; recorded if trained,
                                                                    Neighbor GRPO's steps)
    images = policy.decode(x_0)

The trajectory is kept in float32 (the network sees it in the policy's latent dtype), so
the stored transitions are exactly the ones the old log-probabilities scored. Log-probs are
stored per element ([N, K, C, h, w]); `RolloutRecord.log_probs("mean")` is Flow-GRPO's
per-sample mean, and region methods weight the elements themselves. `rescore` recomputes a
stored step under the current (or the reference) policy: the other half of the ratio.
"""

from dataclasses import dataclass
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
    latents:     [N, C, h, w] the final latents;  images: [N, 3, H, W] decoded, in [0, 1]
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
    """

    def __init__(
        self,
        steps: int = 10,
        shift: float = 1.0,
        noise_level: float = 1.0,
        noise: NoiseBuilder | None = None,
    ):
        sigma_schedule(steps, shift)  # bad values fail here, at construction
        self.steps, self.shift, self.noise_level = steps, shift, noise_level
        self.noise = noise or IndependentNoise()

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
    ) -> RolloutRecord:
        """Roll out `group_size` edits of each (source [B, 3, H, W], instruction)."""
        if not plan.train_steps:
            raise ValueError("the sampling plan trains no step: nothing to record")
        sde_trained = [k in plan.sde_steps for k in plan.train_steps]
        if any(sde_trained) and not all(sde_trained):
            raise ValueError(
                f"the plan trains SDE and ODE steps together ({plan.train_steps}, SDE steps "
                f"{plan.sde_steps}); a policy objective takes one kind: train either only SDE "
                "steps (log-probabilities) or only ODE steps (Neighbor GRPO's distances)"
            )
        g = group_size
        cond = policy.encode_condition(source, instructions).repeat_interleave(g)
        n = source.shape[0] * g
        shape = (n, *policy.latent_shape(tuple(source.shape[-2:])))
        dtype = policy.latent_dtype
        like = torch.empty(shape, dtype=dtype, device=source.device)
        x = self.noise.initial(like, g, generator, regions).float()
        sigmas = sigma_schedule(self.steps, self.shift, source.device)
        states, nexts, logps = [], [], []
        with policy.capture_attention(attention) as maps:
            for i in range(self.steps):
                v = policy.velocity(x.to(dtype), sigmas[i].expand(n), cond)
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
        steps = torch.tensor(plan.train_steps, device=source.device, dtype=torch.long)
        latents = x.to(dtype)
        return RolloutRecord(
            condition=cond,
            states=torch.stack(states, 1),
            next_states=torch.stack(nexts, 1),
            log_prob_elements=torch.stack(logps, 1) if logps else None,
            train_steps=tuple(plan.train_steps),
            sigmas=sigmas[steps],
            sigma_next=sigmas[steps + 1],
            sigma_max=sigmas[1],
            latents=latents,
            images=policy.decode(latents),
            group_size=g,
            attention=torch.stack(maps).mean(0) if attention else None,
            regions=regions,
        )

    def rescore(self, policy: "EditPolicy", record: RolloutRecord, rows: Tensor, k: int) -> SDEStep:
        """Stored step k of `rows` under `policy` as it is now (with grad, unless the caller
        disables it): per-element log-prob of the recorded transition, mean and std."""
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
            **kwargs,
        )
