"""Flow-GRPO with object-level spatial rewards: the Talk2Move core.

One training step reads top to bottom (manual optimisation; the loop is `training_step`):

    record  = sampler(policy, source, instruction, G, plan)    lit_grpo.sampling.rollout
    scores  = scorer(record.images, batch, G)                  lit_grpo.rewards.scoring
    targets = advantages(scores.total)                         gathered over ranks, per group
    stats   = update(self, sampler, record, targets)           lit_grpo.modules.update

1. the sampler encodes each condition once, rolls out G edits per condition with the plan of
   the sampling strategy (SDE steps record transitions and per-element log-probs; the noise
   comes from the noise builder) and decodes them;
2. the scorer segments the object once in the sources and once in the edits and runs every
   reward (they see the instruction's parsed spec, never the ground truth);
3. rewards of all ranks are gathered and normalised per group; zero-spread groups and
   non-finite rewards are counted and skipped;
4. the update: inner epochs x minibatches x trained steps of the clipped ratio loss
   (+ beta x KL to the adapter-off reference), gradient clipping, LR schedule; a minibatch
   with a non-finite loss or gradient is skipped, and too many such iterations in a row
   stop the run; so do too many iterations in a row with nothing to train
   (`lit_grpo.modules.stalls`: the CLI says why in one line, exit 1, the run ends FAILED).

Host syncs: sampling, scoring and the update read nothing back from the device (see
`lit_grpo.sampling.rollout`, `lit_grpo.modules.update`); the statistics stay tensors until
`_log_step` logs them. One value is read between the rewards and the update, with no
phase running: whether any row of any rank trains (gathered data, so every rank decides
alike). An iteration with nothing to train (every group zero-spread, every reward NaN)
then runs no forward or backward pass at all, and reads two counts more, to name its cause
(`lit_grpo.modules.stalls.skip_cause`). `micro_batch_size` bounds the rows one
forward pass sees in sampling and in the update; activation checkpointing
(`EditPolicy.checkpoint_activations`) and bf16 are the policy's and the Trainer's
(`precision: bf16-mixed`).

`trainer.global_step` (and so `max_steps`) counts GRPO iterations: it advances by exactly
one per training batch, whether the batch stepped the optimiser minibatches x inner_epochs
times or, all its groups skipped, not at all (see `_count_iteration`).

The training randomness (rollout noise, minibatch order, early-exit probes) comes from the
module's own CPU `generator`, seeded from the run's seed and rank and saved in checkpoints,
and the data order resumes mid-epoch (`lit_grpo.datamodules.resumable`): a run killed and
resumed from its checkpoint trains the same weights as one never stopped.

Departures from the Flow-GRPO reference code, on purpose: rewards are computed
synchronously (no thread pool: CPU-sized), and the condition encoders are frozen (only the
denoiser trains), so the encoding of step 1 is reused by the update.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_grpo.metrics import EditMetrics
from lit_grpo.modules.objectives import (
    Advantages,
    gathered_group_advantages,
    group_advantages,
)
from lit_grpo.modules.phases import PhaseClock, announce_phase
from lit_grpo.modules.sharding import ShardingSettings
from lit_grpo.modules.stage import PolicyStage
from lit_grpo.modules.stalls import NONFINITE_LOSS, InARow, skip_cause
from lit_grpo.modules.statistics import nanmean, step_statistics
from lit_grpo.modules.update import ClippedUpdate, PolicyTargets
from lit_grpo.perception.segmenters import ColourSegmenter, Segmenter
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.rewards.base import Reward, RewardInputs
from lit_grpo.rewards.scoring import Scorer, Scores
from lit_grpo.sampling.noise import NoiseBuilder
from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler
from lit_grpo.sampling.strategies import EarlyExit, FullTrajectory, SamplingPlan, SamplingStrategy


class GRPOModule(PolicyStage):
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
        noise: where a group's randomness comes from (independent noise by default).
        clip_range: PPO clip epsilon (Talk2Move: 2e-4).
        kl_beta: weight of the KL to the reference, on Flow-GRPO's scale (beta values from
            Flow-GRPO carry over; see `objectives.kl_to_reference`).
        adv_std: "global" (Flow-GRPO) or "group" advantage normalisation; adv_clamp: +- clamp.
        inner_epochs, minibatches: passes over each rollout batch, and splits per pass.
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW with linear warm-up, clipping.
            The LR schedule steps with every optimiser step the update attempts
            (minibatches x inner_epochs per iteration), so warmup_steps counts attempted
            optimiser steps, not iterations: a step skipped on the device (a minibatch with
            no valid row, a non-finite loss or gradient) still advances it (deciding on the
            host would stall the GPU at every minibatch), while an iteration with no valid
            row on any rank attempts none (its update does not run) and does not use up
            the warm-up.
        max_nonfinite_in_a_row: stop with an error after this many consecutive iterations
            whose loss or gradient was not finite (their steps are skipped, not taken).
        max_skipped_in_a_row: stop with an error after this many consecutive iterations
            with nothing to train (every group zero-spread, every reward non-finite, the
            object found in no edit), naming the cause (`lit_grpo.modules.stalls`). 20 is
            far above the streaks a run that learns shows, and costs a few minutes at most.
        eval_steps: ODE steps for validation edits.
        grid_size: validation edits in the logged image grid.
        metrics: the edit metrics for validation and test (`EditMetrics()`, the spatial
            ones and background L1, by default; add LPIPS / CLIP there).
        sharding: FSDP2 settings, used under `ModelParallelStrategy` only
            (configs/strategy/fsdp.yaml; `lit_grpo.modules.sharding`).
        micro_batch_size: the most rollouts one forward (and backward) pass of the policy
            sees, in sampling and in the update (None: all of them at once). Memory scales
            with it; rollouts and gradients do not change.
    """

    full_finetune = "denoiser"
    capture_attention = False  # record the instruction-to-image attention (region methods)

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
        noise: NoiseBuilder | None = None,
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
        max_nonfinite_in_a_row: int = 3,
        max_skipped_in_a_row: int = 20,
        eval_steps: int = 10,
        grid_size: int = 4,
        metrics: EditMetrics | None = None,
        sharding: ShardingSettings | None = None,
        micro_batch_size: int | None = None,
    ):
        if not rewards:
            raise ValueError("GRPO needs at least one reward")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group advantages, got {group_size}")
        for name, limit in (
            ("max_nonfinite_in_a_row", max_nonfinite_in_a_row),
            ("max_skipped_in_a_row", max_skipped_in_a_row),
        ):
            if limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}")
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        if isinstance(strategy, EarlyExit) and strategy.exit_step >= sample_steps:
            # EarlyExit.plan would clamp it to the last step and train something else
            raise ValueError(
                f"the EarlyExit strategy's exit_step {strategy.exit_step} is past the "
                f"schedule of sample_steps={sample_steps} (steps 0..{sample_steps - 1}); set "
                f"exit_step to at most {sample_steps - 1} or raise sample_steps"
            )
        if lora is None and kl_beta > 0:
            raise ValueError(
                "kl_beta > 0 needs a LoRA adapter: the reference is the adapter-off view"
            )
        segmenter = segmenter or ColourSegmenter()
        super().__init__(policy, lora, segmenter, metrics, sharding)
        self.save_hyperparameters(
            ignore=["policy", "rewards", "segmenter", "strategy", "noise", "metrics"]
        )
        self.automatic_optimization = False
        self.sampler = RolloutSampler(
            sample_steps, sample_shift, noise_level, noise, micro_batch_size
        )
        self.scorer = Scorer(rewards, segmenter)
        self.strategy = strategy or FullTrajectory()
        self.updater = ClippedUpdate(
            clip_range, kl_beta, inner_epochs, minibatches, max_grad_norm, micro_batch_size
        )
        self.iteration = 0  # GRPO iterations (rollout batches), whether or not they step
        # consecutive iterations that stepped nothing (a non-finite loss or gradient), and
        # that had nothing to train: each stops the run at its limit (modules/stalls.py)
        self.nonfinite_streak = InARow(
            max_nonfinite_in_a_row,
            "stepped nothing",
            "max_nonfinite_in_a_row",
            "Those steps were skipped, not taken. Lower the learning rate, check the policy's "
            "outputs and the rewards (groups/dropped_samples), or resume from the last "
            "checkpoint.",
        )
        self.skipped_streak = InARow(
            max_skipped_in_a_row,
            "trained nothing",
            "max_skipped_in_a_row",
            "Look at a few scored rollouts (lit_grpo.callbacks.RolloutImageLogger): do the "
            "rewards and the segmenter work on this data?",
        )
        self.phase = "idle"
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of every training draw (rollout noise, minibatch order), saved in
        checkpoints. Seeded on first use from the run's seed (`seed_everything`, i.e.
        `torch.initial_seed()`) plus the data-parallel rank, so ranks explore differently; a
        CPU generator gives the same noise on any device and its state resumes on another
        one."""
        if self._generator is None:
            seed = torch.initial_seed() + self.data_parallel_rank
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator

    @property
    def rewards(self) -> torch.nn.ModuleList:
        return self.scorer.rewards

    @property
    def eval_schedule(self) -> tuple[int, float]:
        return self.hparams.eval_steps, self.hparams.sample_shift

    # --- the four pieces --------------------------------------------------------------------
    def sample(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        plan: SamplingPlan | None = None,
    ) -> RolloutRecord:
        """G rollouts per condition following `plan` (the strategy's plan by default), with
        the noise of `generator` (the module's own by default)."""
        plan = plan or self.strategy.plan(self.hparams.sample_steps, self.iteration)
        generator = generator if generator is not None else self.generator
        return self.sampler(
            self.policy,
            batch["source"],
            list(batch["instruction"]),
            self.hparams.group_size,
            plan,
            generator,
            attention=self.capture_attention,
            regions=self.sample_regions(batch),
        )

    def sample_regions(self, batch: dict) -> Tensor | None:
        """The edit regions [B * G, h, w] (latent resolution, in [0, 1]) handed to the noise
        builder; None here. Region methods (RC-GRPO) override it."""
        return None

    def observe(
        self, images: Tensor, batch: dict, repeats: int = 1, attention: Tensor | None = None
    ) -> RewardInputs:
        """What the rewards see of `images` (the scorer's view; region methods add to it)."""
        return self.scorer.observe(images, batch, repeats, attention=attention)

    def score(self, record: RolloutRecord, batch: dict) -> Scores:
        """Every reward of the rollouts, and their weighted total."""
        g = record.group_size
        return self.scorer.judge(self.observe(record.images, batch, g, record.attention))

    def advantages(self, scores: Scores, record: RolloutRecord) -> tuple[Advantages, PolicyTargets]:
        """Group advantages of the total rewards of every rank, and this rank's targets."""
        adv, values, valid = self.group_advantages(scores.total)
        return adv, PolicyTargets(values, valid, self.loss_denominator(adv))

    def group_advantages(self, rewards: Tensor) -> tuple[Advantages, Tensor, Tensor]:
        """`gathered_group_advantages` with this stage's `normalise`: (all ranks' advantages,
        this rank's values [N], this rank's valid rows [N])."""
        return gathered_group_advantages(
            rewards, self.hparams.group_size, self.gather, self.data_parallel_rank, self.normalise
        )

    def loss_denominator(self, adv: Advantages) -> Tensor:
        """Valid rows of all ranks per minibatch and data-parallel rank (at least 1; a 0-d
        tensor, not read back): the gradient average of DDP and FSDP over the data-parallel
        ranks then equals the single-process mean (exact with one minibatch)."""
        world = self.data_parallel_size
        return (adv.valid.sum() / (world * self.hparams.minibatches)).clamp_min(1.0)

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        """Per-group advantages of the gathered rewards [B * G] (GRPO's z-score here)."""
        return group_advantages(
            rewards, group_size, std=self.hparams.adv_std, clamp=self.hparams.adv_clamp
        )

    # --- the loop -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        if not getattr(self, "_memory_checked", False):
            self._check_rollout_memory(batch)
        clock = PhaseClock(self.device)
        with self._phase("sampling", clock):
            record = self.sample(batch)
        with self._phase("rewards", clock):
            scores = self.score(record, batch)
            adv, targets = self.advantages(scores, record)
        # the one value a step reads back before it logs, with no phase running: whether
        # any row of any rank trains (identical on every rank: computed on gathered data).
        # With nothing to train the update's forward and backward passes would all be
        # masked: they do not run, and neither the optimiser nor the LR schedule steps
        self._set_phase("idle")
        skipped = not bool(adv.valid.any())
        if skipped:
            zero = torch.zeros((), device=self.device)
            stats = {"optimizer_steps": zero, "nonfinite_skipped": zero}
        else:
            with self._phase("update", clock):
                stats = self.updater(self, self.sampler, record, targets, self.generator)
            self._set_phase("idle")
        self._log_step(batch, scores, adv, stats, clock, skipped)
        self.iteration += 1
        self._count_iteration()
        # for callbacks (lit_grpo.callbacks.RolloutImageLogger); Lightning detaches nothing here
        return {
            "rollout": {
                "source": batch["source"],
                "edits": record.images,
                "rewards": scores.total,
                "instruction": list(batch["instruction"]),
            }
        }

    def samples_per_step(self, batch: dict) -> int:
        """Images one training step samples on this device (B x G): what
        `lit_grpo.callbacks.ThroughputMonitor` counts."""
        return batch["source"].shape[0] * self.hparams.group_size

    def _log_step(
        self,
        batch: dict,
        scores: Scores,
        adv: Advantages,
        stats: dict,
        clock: PhaseClock,
        skipped: bool,
    ) -> None:
        """Log the step: where its statistics are read back from the device."""
        log = step_statistics(scores, adv)
        log.update({f"train/{k}": v for k, v in stats.items()})
        timings = {"update": 0.0, **clock.seconds()}  # a skipped update took no time
        log.update({f"time/{k}": v for k, v in timings.items()})
        n_cond = batch["source"].shape[0]
        self.log_dict(log, batch_size=n_cond)
        self.log("reward", log["reward/total"], prog_bar=True, logger=False, batch_size=n_cond)
        step = self.global_step
        if skipped:  # nothing computed: neither breaks nor extends a non-finite streak
            cause = skip_cause(scores.total, scores.parts["object_found"], self.gather)
            self.skipped_streak.update(cause, self.iteration, step)
            return
        self.skipped_streak.update(None, self.iteration, step)
        nonfinite = bool(stats["nonfinite_skipped"] > 0)
        self.nonfinite_streak.update(NONFINITE_LOSS if nonfinite else None, self.iteration, step)

    @property
    def nonfinite_in_a_row(self) -> int:
        """Consecutive iterations with a non-finite loss or gradient, up to now."""
        return self.nonfinite_streak.count

    def _count_iteration(self) -> None:
        """Advance `trainer.global_step` by one: it counts GRPO iterations.

        Under manual optimisation Lightning counts every `LightningOptimizer.step()` as a
        global step (`optim_step_progress` of the manual-optimisation loop), so
        `max_steps` would mean minibatches x inner_epochs per iteration, and a run whose
        iterations all skip (every group zero-spread, every reward NaN) would never reach
        it. The update therefore steps through `strategy.optimizer_step`, which bypasses
        the counting hooks, and each training batch completes exactly one step here. The
        counter lives in the loop's state, so checkpoints resume at the right step.
        """
        if self._trainer is None:
            return
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _check_rollout_memory(self, batch: dict) -> None:
        """Before the fit's first rollout: refuse (on every rank) a batch and group whose
        rollouts alone would not fit this rank's memory (`lit_grpo.sampling.memory`)."""
        from lit_grpo.checks import ConfigError
        from lit_grpo.sampling.memory import available_bytes, check_rollout_memory

        self._memory_checked = True
        source = batch["source"]  # [B, 3, H, W]
        image = tuple(source.shape[1:])
        latent = self.policy.latent_shape(tuple(source.shape[-2:]))
        plan = self.strategy.plan(self.hparams.sample_steps, self.iteration)
        with torch.no_grad():  # one condition, to measure what each rollout repeats
            one = self.policy.encode_condition(source[:1], list(batch["instruction"])[:1])
        tensors = [t for t in vars(one).values() if isinstance(t, torch.Tensor)]
        condition = sum(t.numel() * t.element_size() for t in tensors)
        available, what = available_bytes(self.device)
        args = (source.shape[0], self.hparams.group_size, plan, latent, image, condition)
        try:
            check_rollout_memory(*args, available, what)
            too_big = None
        except ConfigError as err:
            too_big = err
        if self._trainer is not None and self.trainer.world_size > 1:
            if self.trainer.strategy.reduce_boolean_decision(too_big is not None, all=False):
                raise too_big or ConfigError("another rank's rollouts would not fit its memory")
        elif too_big is not None:
            raise too_big

    @contextmanager
    def _phase(self, phase: str, clock: PhaseClock) -> Iterator[None]:
        self._set_phase(phase)
        clock.start(phase)
        yield
        clock.stop(phase)

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        announce_phase(self._trainer, phase)

    # --- the early-exit protocol (lit_grpo.callbacks.EarlyExitSelector) -----------------------
    @torch.no_grad()
    def exit_step_variance(self, batch: dict, candidates: list[int]) -> Tensor:
        """Mean within-group variance of the total reward when exiting at each candidate."""
        self._set_phase("probing exit steps")
        out = []
        for k in candidates:
            record = self.sample(batch, plan=EarlyExit(k).plan(self.hparams.sample_steps))
            groups = self.score(record, batch).total
            groups = groups.view(-1, self.hparams.group_size)
            groups = groups[torch.isfinite(groups).all(1)]
            out.append(groups.var(1).mean() if groups.numel() else groups.new_zeros(()))
        return torch.stack(out)

    def set_exit_step(self, step: int) -> None:
        if not isinstance(self.strategy, EarlyExit):
            raise TypeError(
                f"set_exit_step needs strategy EarlyExit, this module samples with "
                f"{type(self.strategy).__name__}; set model.init_args.strategy to "
                "lit_grpo.sampling.strategies.EarlyExit"
            )
        self.strategy.exit_step = step

    # --- validation and test: ODE edits, the same rewards, the edit metrics -------------------
    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> Tensor:
        """ODE edits scored by the training rewards (logs `{stage}/reward` and every part)
        and by the edit metrics (logged at the end of the epoch)."""
        with self.policy.capture_attention(self.capture_attention) as maps:
            edits = self.edit(batch["source"], batch["instruction"], seed=batch_idx)
        attention = torch.stack(maps).mean(0) if maps else None  # over the ODE steps
        inputs = self.observe(edits, batch, attention=attention)
        self.edit_metrics.update(batch["source"], edits, batch, inputs.before, inputs.after)
        scores = self.scorer.judge(inputs)
        n = batch["source"].shape[0]
        self.log(
            f"{stage}/reward", nanmean(scores.total), batch_size=n, sync_dist=True, prog_bar=True
        )
        for key, value in scores.parts.items():
            self.log(f"{stage}/{key}", nanmean(value), batch_size=n, sync_dist=True)
        return edits

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        edits = self._evaluate(batch, batch_idx, "val")
        self.keep_grid(batch_idx, batch["source"], edits)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        # fused: one kernel for all parameters, and it can skip a step on the device (the
        # update's degenerate minibatches) without reading a flag back to the host
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        opt = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused
        )
        warmup = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return [opt], [sched]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo_iteration"] = self.iteration
        checkpoint["grpo_nonfinite_in_a_row"] = self.nonfinite_in_a_row
        checkpoint["grpo_skipped_in_a_row"] = self.skipped_streak.state_dict()
        # every data-parallel rank draws its own noise: the checkpoint (written by rank 0, or
        # rank 0's meta.pt) keeps them all, [ranks, state bytes]
        checkpoint["grpo_generators"] = self.gather(self.generator.get_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.iteration = int(checkpoint.get("grpo_iteration", 0))
        nonfinite = int(checkpoint.get("grpo_nonfinite_in_a_row", 0))
        self.nonfinite_streak.load_state_dict({"causes": {NONFINITE_LOSS: nonfinite}})
        self.skipped_streak.load_state_dict(checkpoint.get("grpo_skipped_in_a_row") or {})
        states = checkpoint.get("grpo_generators")
        if states is None and checkpoint.get("grpo_generator") is not None:
            states = checkpoint["grpo_generator"][None]  # written before ranks were kept
        if states is None:  # older checkpoints: a fresh seed
            return
        states = states.reshape(-1, states.shape[-1])
        if states.shape[0] != self.data_parallel_size:
            rank_zero_warn(
                f"the checkpoint holds the rollout noise of {states.shape[0]} data-parallel "
                f"rank(s), this run has {self.data_parallel_size}: the noise restarts from "
                "the seed, so the run will not repeat the interrupted one exactly"
            )
            return
        self.generator.set_state(states[self.data_parallel_rank].clone())  # own storage
