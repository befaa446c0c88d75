"""Flow-GRPO with object-level spatial rewards: the Talk2Move core.

One training step, top to bottom (manual optimisation; the loop is `training_step`):
1. encode each condition once, repeat it G times (a group per condition);
2. roll out with the plan of the sampling strategy: SDE steps record (x_t, x_t+1, log p),
   the other steps are ODE steps; decode the final latents to images;
3. segment the object once in the sources and once in the edits, score every reward;
4. gather rewards across ranks, normalise per group (zero-spread groups and non-finite
   rewards are counted and skipped), keep this rank's slice;
5. inner epochs x minibatches x trained steps: re-score each stored step under the current
   policy, clipped ratio loss (+ beta * KL to the reference = adapter off), one optimiser
   step per minibatch, gradient clipping, LR schedule.

Departures from the Flow-GRPO reference code, on purpose: rewards are computed
synchronously (no thread pool: CPU-sized), and the condition encoders are frozen (only the
denoiser trains), so the encoding of step 1 is reused by the update.
"""

import time
from contextlib import nullcontext

import lightning as L
import torch
from torch import Tensor

from lit_grpo.loggers import log_image
from lit_grpo.metrics import EditMetrics
from lit_grpo.modules.evaluation import report_edit_metrics
from lit_grpo.modules.grids import edit_grid
from lit_grpo.modules.objectives import (
    clipped_policy_loss,
    gathered_group_advantages,
    kl_to_reference,
)
from lit_grpo.modules.rollout import Rollout
from lit_grpo.perception.segmenters import ColourSegmenter, Segmenter
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.policies.weights import policy_checkpoint_entry
from lit_grpo.rewards.base import Reward, RewardInputs
from lit_grpo.sampling import ode_step, randn_like, shortcut_to_data, sigma_schedule
from lit_grpo.sampling.sde import sde_step
from lit_grpo.sampling.strategies import (
    EarlyExit,
    FullTrajectory,
    SamplingPlan,
    SamplingStrategy,
)


class GRPOModule(L.LightningModule):
    """Flow-GRPO post-training of an `EditPolicy` against weighted rewards.

    Args:
        policy: the editing policy; start it from SFT weights (`weights:`).
        rewards: reward judges; each carries its `weight` in the total.
        segmenter: finds the instructed object in sources and edits (ShapeWorld colours by
            default; any `Segmenter`).
        lora: the adapter to train (its adapter-off view is the KL reference); None trains
            the whole denoiser (then kl_beta must be 0).
        group_size: G rollouts per condition.
        sample_steps, sample_shift: the denoising schedule.
        noise_level: SDE noise level a (Talk2Move: 1.0).
        strategy: which steps explore and train (full trajectory by default).
        clip_range: PPO clip epsilon (Talk2Move: 2e-4).
        kl_beta: weight of the KL to the reference.
        adv_std: "global" (Flow-GRPO) or "group" advantage normalisation; adv_clamp: +- clamp.
        inner_epochs, minibatches: passes over each rollout batch, and splits per pass.
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW with linear warm-up, clipping.
        eval_steps: ODE steps for validation edits.
        grid_size: validation edits in the logged image grid.
        metrics: the edit metrics for validation and test (`EditMetrics()`, the
            spatial ones and background L1, by default; add LPIPS / CLIP there).
    """

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        segmenter: Segmenter | None = None,
        lora: LoraSettings | None = None,
        group_size: int = 8,
        sample_steps: int = 10,
        sample_shift: float = 1.0,
        noise_level: float = 1.0,
        strategy: SamplingStrategy | None = None,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_std: str = "global",
        adv_clamp: float = 5.0,
        inner_epochs: int = 1,
        minibatches: int = 1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        eval_steps: int = 10,
        grid_size: int = 4,
        metrics: EditMetrics | None = None,
    ):
        super().__init__()
        if not rewards:
            raise ValueError("GRPO needs at least one reward")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group advantages, got {group_size}")
        if lora is None and kl_beta > 0:
            raise ValueError(
                "kl_beta > 0 needs a LoRA adapter: the reference is the adapter-off view"
            )
        self.save_hyperparameters(ignore=["policy", "rewards", "segmenter", "strategy", "metrics"])
        self.automatic_optimization = False
        self.policy = policy
        policy.requires_grad_(False)
        if lora is not None:
            policy.add_lora(lora)
        else:
            policy.denoiser.requires_grad_(True)
        self.rewards = torch.nn.ModuleList(rewards)
        self.segmenter = segmenter or ColourSegmenter()
        self.strategy = strategy or FullTrajectory()
        self.edit_metrics = metrics or EditMetrics()
        self.phase = "idle"
        self._grid: dict | None = None

    # --- 1-2: rollouts -------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        plan: SamplingPlan | None = None,
    ) -> Rollout:
        """G rollouts per condition following `plan` (the strategy's plan by default)."""
        g = self.hparams.group_size
        cond = self.policy.encode_condition(batch["source"], batch["instruction"])
        cond = cond.repeat_interleave(g)
        like = self.policy.encode_images(batch["source"]).repeat_interleave(g, 0)
        x = randn_like(like, generator)
        sigmas = sigma_schedule(self.hparams.sample_steps, self.hparams.sample_shift, self.device)
        plan = plan or self.strategy.plan(self.hparams.sample_steps, self.global_step)
        states, nexts, logps = [], [], []
        for i in range(self.hparams.sample_steps):
            v = self.policy.velocity(x, sigmas[i].expand(x.shape[0]), cond)
            if i == plan.exit_step:  # early exit: jump from sigma_i straight to the data
                x = shortcut_to_data(x, v, sigmas[i])
                break
            if i in plan.sde_steps:
                step = sde_step(
                    x,
                    v,
                    sigmas[i],
                    sigmas[i + 1],
                    self.hparams.noise_level,
                    generator=generator,
                    sigma_max=sigmas[1],
                )
                if i in plan.train_steps:
                    states.append(x)
                    nexts.append(step.sample)
                    logps.append(step.log_prob)
                x = step.sample
            else:
                x = ode_step(x, v, sigmas[i], sigmas[i + 1])
        steps = torch.tensor(plan.train_steps, device=self.device, dtype=torch.long)
        return Rollout(
            condition=cond,
            states=torch.stack(states, 1),
            next_states=torch.stack(nexts, 1),
            log_probs=torch.stack(logps, 1),
            sigmas=sigmas[steps],
            sigma_next=sigmas[steps + 1],
            sigma_max=sigmas[1],
            images=self.policy.decode(x),
        )

    # --- 3: rewards ------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, images: Tensor, batch: dict, repeats: int) -> RewardInputs:
        """What the judges see: the edits, their sources and conditions (one row per rollout)
        and the object segmented once per source and once per edit."""
        rows = {k: _repeat(v, repeats) for k, v in batch.items()}
        before = self.segmenter(batch["source"], batch["object"])
        return RewardInputs(
            images=images,
            source=batch["source"].repeat_interleave(repeats, 0),
            batch=rows,
            before=before.repeat_interleave(repeats),
            after=self.segmenter(images, rows["object"]),
        )

    @torch.no_grad()
    def judge(self, inputs: RewardInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted total reward [N] and every reward's and sub-score's values (for logging)."""
        total = torch.zeros(inputs.images.shape[0], device=inputs.images.device)
        parts = {"object_found": inputs.after.found.float()}
        for reward in self.rewards:
            out = reward(inputs)
            total = total + reward.weight * out.scores.float()
            parts[reward.name] = out.scores.float()
            parts.update(out.extras)
        return total, parts

    def score(self, images: Tensor, batch: dict, repeats: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.judge(self.observe(images, batch, repeats))

    # --- 4: advantages (gathered across ranks) ---------------------------------------------
    def advantages(self, rewards: Tensor):
        return gathered_group_advantages(
            rewards,
            self.hparams.group_size,
            self.all_gather,
            self.global_rank,
            std=self.hparams.adv_std,
            clamp=self.hparams.adv_clamp,
        )

    # --- 5: the update ---------------------------------------------------------------------
    def step_log_prob(self, rollout: Rollout, rows: Tensor, k: int):
        """Log-prob of stored step k for `rows` under the current policy (with grad)."""
        x = rollout.states[rows, k]
        sigma = rollout.sigmas[k].expand(x.shape[0])
        v = self.policy.velocity(x, sigma, rollout.condition[rows])
        step = sde_step(
            x,
            v,
            rollout.sigmas[k],
            rollout.sigma_next[k],
            self.hparams.noise_level,
            prev_sample=rollout.next_states[rows, k],
            sigma_max=rollout.sigma_max,
        )
        return step, x, sigma

    def update(self, rollout: Rollout) -> dict[str, float]:
        opt, sched = self.optimizers(), self.lr_schedulers()
        hp = self.hparams
        n, num_steps = len(rollout), rollout.states.shape[1]
        stats = {
            "loss": 0.0,
            "approx_kl": 0.0,
            "clip_fraction": 0.0,
            "ratio": 0.0,
            "kl": 0.0,
            "grad_norm": 0.0,
        }
        count, opt_steps = 0, 0
        sync_block = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        for _ in range(hp.inner_epochs):
            order = (
                torch.randperm(n, device=self.device)
                if hp.minibatches > 1
                else torch.arange(n, device=self.device)
            )
            for rows in order.chunk(hp.minibatches):
                weights = rollout.valid[rows].float()
                opt.zero_grad(set_to_none=True)
                for k in range(num_steps):
                    ctx = sync_block() if k < num_steps - 1 else nullcontext()
                    with ctx:
                        step, x, sigma = self.step_log_prob(rollout, rows, k)
                        loss, s = clipped_policy_loss(
                            step.log_prob,
                            rollout.log_probs[rows, k],
                            rollout.advantages[rows],
                            hp.clip_range,
                            weights,
                            rollout.loss_denominator,
                        )
                        if hp.kl_beta > 0:
                            with torch.no_grad(), self.policy.reference():
                                v_ref = self.policy.velocity(x, sigma, rollout.condition[rows])
                            ref = sde_step(
                                x,
                                v_ref,
                                rollout.sigmas[k],
                                rollout.sigma_next[k],
                                hp.noise_level,
                                prev_sample=rollout.next_states[rows, k],
                                sigma_max=rollout.sigma_max,
                            )
                            kl = kl_to_reference(step.mean, ref.mean, step.std)
                            kl = (kl * weights).sum() / rollout.loss_denominator
                            loss = loss + hp.kl_beta * kl
                            stats["kl"] += kl.item()
                        self.manual_backward(loss / num_steps)
                    stats["loss"] += loss.item()
                    stats["approx_kl"] += s.approx_kl.item()
                    stats["clip_fraction"] += s.clip_fraction.item()
                    stats["ratio"] += s.ratio_mean.item()
                    count += 1
                norm = self._grad_norm()
                self.clip_gradients(
                    opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm"
                )
                opt.step()
                sched.step()
                stats["grad_norm"] += norm
                opt_steps += 1
        out = {k: v / max(count, 1) for k, v in stats.items() if k != "grad_norm"}
        out["grad_norm"] = stats["grad_norm"] / max(opt_steps, 1)
        return out

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        return torch.stack(grads).norm().item() if grads else 0.0

    # --- the loop -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        n_cond = batch["source"].shape[0]
        timings = {}
        self._set_phase("sampling")
        t = time.perf_counter()
        rollout = self.rollout(batch)
        timings["time/sampling"] = time.perf_counter() - t

        self._set_phase("rewards")
        t = time.perf_counter()
        total, parts = self.score(rollout.images, batch, self.hparams.group_size)
        timings["time/rewards"] = time.perf_counter() - t

        adv, rollout.advantages, rollout.valid = self.advantages(total)
        # valid rows of all ranks per minibatch and rank: DDP's gradient average then equals
        # the single-process mean (exact with one minibatch)
        world = self.trainer.world_size if self._trainer is not None else 1
        rollout.loss_denominator = max(
            adv.valid.sum().item() / (world * self.hparams.minibatches), 1.0
        )
        rollout.rewards = total
        log = {f"reward/{k}": _nanmean(v) for k, v in parts.items()}
        log.update({f"reward_std/{k}": _nanstd(v) for k, v in parts.items()})
        log.update(
            {
                "reward/total": _nanmean(total),
                "reward_std/total": _nanstd(total),
                "adv/mean": adv.values[adv.valid].mean().item() if adv.valid.any() else 0.0,
                "adv/std": adv.values[adv.valid].std().item() if adv.valid.sum() > 1 else 0.0,
                "adv/abs_max": adv.values.abs().max().item(),
                "groups/zero_spread_fraction": adv.zero_spread.float().mean().item(),
                "groups/dropped_samples": (~torch.isfinite(total)).sum().item(),
            }
        )
        skipped = not bool(adv.valid.any())  # identical on every rank: computed on gathered data
        log["train/skipped"] = float(skipped)
        if not skipped:
            self._set_phase("update")
            t = time.perf_counter()
            stats = self.update(rollout)
            timings["time/update"] = time.perf_counter() - t
            log.update({f"train/{k}": v for k, v in stats.items()})
        else:
            timings["time/update"] = 0.0
        log.update(timings)
        self.log_dict(log, batch_size=n_cond)
        self.log("reward", log["reward/total"], prog_bar=True, logger=False, batch_size=n_cond)
        self._set_phase("idle")
        # for callbacks (lit_grpo.callbacks.RolloutImageLogger); Lightning detaches nothing here
        return {
            "rollout": {
                "source": batch["source"],
                "edits": rollout.images,
                "rewards": total,
                "instruction": list(batch["instruction"]),
            }
        }

    @property
    def lora_module(self) -> torch.nn.Module | None:
        """The module carrying the LoRA adapter (lit_grpo.callbacks.LoraExporter's protocol)."""
        return self.policy.denoiser if self.hparams.lora is not None else None

    # --- the early-exit protocol (lit_grpo.callbacks.EarlyExitSelector) -----------------------
    @torch.no_grad()
    def exit_step_variance(self, batch: dict, candidates: list[int]) -> Tensor:
        """Mean within-group variance of the total reward when exiting at each candidate."""
        self._set_phase("probing exit steps")
        out = []
        for k in candidates:
            rollout = self.rollout(batch, plan=EarlyExit(k).plan(self.hparams.sample_steps))
            total, _ = self.score(rollout.images, batch, self.hparams.group_size)
            groups = total.view(-1, self.hparams.group_size)
            groups = groups[torch.isfinite(groups).all(1)]
            out.append(groups.var(1).mean() if groups.numel() else total.new_zeros(()))
        return torch.stack(out)

    def set_exit_step(self, step: int) -> None:
        if not isinstance(self.strategy, EarlyExit):
            raise TypeError(
                f"set_exit_step needs strategy EarlyExit, this module samples with "
                f"{type(self.strategy).__name__}; set model.init_args.strategy to "
                "lit_grpo.sampling.strategies.EarlyExit"
            )
        self.strategy.exit_step = step

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        bar = self.trainer.progress_bar_callback if self._trainer is not None else None
        if bar is not None and hasattr(bar, "set_phase"):
            bar.set_phase(phase)

    # --- validation: ODE edits, the same rewards, a grid --------------------------------------
    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> Tensor:
        """ODE edits scored by the training rewards (logs `{stage}/reward` and every part)
        and by the edit metrics (logged at the end of the epoch)."""
        edits = self.edit(batch["source"], batch["instruction"], seed=batch_idx)
        inputs = self.observe(edits, batch, 1)
        self.edit_metrics.update(batch["source"], edits, batch, inputs.before, inputs.after)
        total, parts = self.judge(inputs)
        n = batch["source"].shape[0]
        self.log(f"{stage}/reward", _nanmean(total), batch_size=n, sync_dist=True, prog_bar=True)
        for key, value in parts.items():
            self.log(f"{stage}/{key}", _nanmean(value), batch_size=n, sync_dist=True)
        return edits

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        report_edit_metrics(self, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.edit(batch["source"], batch["instruction"], seed=batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        edits = self._evaluate(batch, batch_idx, "val")
        if batch_idx == 0:
            k = self.hparams.grid_size
            self._grid = {"source": batch["source"][:k], "edits": edits[:k]}

    def on_validation_epoch_end(self) -> None:
        report_edit_metrics(self, "val")
        if self._grid is not None and not self.trainer.sanity_checking:
            log_image(
                self.trainer,
                "val/edits",
                edit_grid(self._grid["source"], self._grid["edits"]),
                step=self.global_step,
            )
        self._grid = None

    def edit(self, source: Tensor, instructions: list[str], seed: int = 0) -> Tensor:
        """ODE-sampled edits [N, 3, H, W] in [0, 1] with seeded noise (the evaluation sampler)."""
        gen = torch.Generator().manual_seed(seed)
        return self.policy.edit(
            source, instructions, self.hparams.eval_steps, self.hparams.sample_shift, gen
        )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return [opt], [sched]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_grpo_policy"] = policy_checkpoint_entry(
            self.policy, checkpoint["state_dict"]
        )


def _repeat(value, repeats: int):
    if isinstance(value, Tensor):
        return value.repeat_interleave(repeats, 0)
    return [v for v in value for _ in range(repeats)]


def _nanmean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.mean().item() if x.numel() else float("nan")


def _nanstd(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.std().item() if x.numel() > 1 else 0.0
