"""The GRPO stage: sample -> score -> advantages -> update, for every objective.

One training step reads top to bottom (manual optimisation; the loop is `training_step`):

    record  = sampler(policy, source, instruction, G, plan)   lit_grpo.sampling.rollout
    scores  = scorer(record.images, batch, G)                 lit_grpo.rewards.scoring
    adv, targets = objective.advantages(scores, G, ranks)     lit_grpo.objectives
    stats   = update(self, objective, sampler, record, targets)   lit_grpo.modules.update

The pieces are components chosen in YAML by `class_path`: the `objective` (one paper's
advantages and loss; `FlowGRPO`, Talk2Move's, by default), the `regions` (a per-condition
region for the noise and the rewards: RC-GRPO's, InstructRL4Pix's), the `noise` builder and
the sampling `strategy`. `RCGRPOModule`, `NeighborRCGRPOModule`, `SpatialFlowGRPOModule`
and `InstructRL4PixModule` are presets of them. Rewards of all ranks are gathered before
the advantages; zero-spread groups and non-finite rewards are counted and skipped, and runs
that train nothing stop, saying why (`lit_grpo.modules.stalls`).

Host syncs: none from the first policy call to the step's logging (`statistics.log_step`)
but one, between the rewards and the update: whether any row of any rank trains (an
iteration with nothing to train runs no forward or backward pass). `trainer.global_step` counts GRPO iterations.

With `score_chunk`, the step samples and scores its conditions a chunk at a time, and with
`overlap_scoring` the rewards of one chunk run in a background thread while the next chunk
samples (`lit_grpo.modules.chunked_scoring`; within the step: never off-policy).

Departures from the Flow-GRPO reference code, on purpose: rewards are computed in the
training thread unless `overlap_scoring` (the reference always uses a thread pool), and the
condition encoders are frozen (only the denoiser trains), so the encoding of step 1 is
reused by the update.
"""

from dataclasses import replace

import torch
from torch import Tensor

from lit_grpo.metrics import EditMetrics
from lit_grpo.modules import training_state
from lit_grpo.modules.chunked_scoring import check_chunking, sample_and_score
from lit_grpo.modules.evaluation import evaluate_grpo_edits
from lit_grpo.modules.phases import PhaseClock, announce_phase
from lit_grpo.modules.regions import Regions
from lit_grpo.modules.rollout_memory import check_first_rollouts
from lit_grpo.modules.sharding import ShardingSettings
from lit_grpo.modules.stage import PolicyStage
from lit_grpo.modules.stalls import Stalls
from lit_grpo.modules.statistics import log_step
from lit_grpo.modules.update import UpdateLoop, adamw_with_warmup
from lit_grpo.objectives import Advantages, FlowGRPO, Objective, PolicyTargets, Ranks
from lit_grpo.perception.segmenters import ColourSegmenter, Segmenter
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.rewards.base import Reward, RewardInputs
from lit_grpo.rewards.scoring import Scorer, Scores
from lit_grpo.sampling.noise import NoiseBuilder
from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler
from lit_grpo.sampling.strategies import EarlyExit, FullTrajectory, SamplingPlan, SamplingStrategy


class GRPOModule(PolicyStage):
    """GRPO post-training of an `EditPolicy` against weighted rewards (see module docstring).

    Args:
        policy: the editing policy; start it from SFT weights (`weights:`).
        rewards: reward judges; each carries its `weight` in the total.
        objective: the advantages and the loss (`lit_grpo.objectives`; `FlowGRPO()` default).
        regions: a per-condition region for the noise builder and the rewards (RC-GRPO's
            `EditRegions`, InstructRL4Pix's `TargetRegions`); None: none.
        noise: where a group's randomness comes from (independent noise by default).
        segmenter: finds the instructed object (ShapeWorld's colours by default).
        lora: the adapter to train (its adapter-off view is the KL reference); None trains
            the whole denoiser (then the objective's kl_beta must be 0).
        group_size: G rollouts per condition.
        sample_steps, sample_shift: the denoising schedule.
        noise_level: SDE noise level a (Talk2Move: 1.0).
        strategy: which steps explore and train (full trajectory by default).
        inner_epochs, minibatches: passes over each rollout batch, and splits per pass.
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW with linear warm-up, clipping.
            warmup_steps counts the optimiser steps the update attempts (minibatches x
            inner_epochs per iteration that trains; those skipped on the device included).
        max_nonfinite_in_a_row, max_skipped_in_a_row: stop after this many iterations in a
            row with a non-finite loss or gradient, or with nothing to train (`stalls`).
        eval_steps, grid_size: ODE steps of validation edits; edits in the logged grid.
        metrics: the edit metrics for validation and test (`EditMetrics()` by default).
        sharding: FSDP2 settings, under `ModelParallelStrategy` only (docs/scaling.md).
        micro_batch_size: the most rollouts one forward (and backward) pass sees, in
            sampling and in the update (None: all); rollouts and gradients do not change.
        score_chunk: sample and score this many conditions (x G rollouts) at a time (None:
            all at once), or a list of chunk sizes in turn, e.g. [4, 2, 1, 1] (its last
            size repeats while conditions remain); the rollouts change (the noise is drawn
            chunk after chunk).
        overlap_scoring: score each chunk in a background thread while the next one
            samples (needs `score_chunk`); rollouts, losses and gradients do not change.
            Gains only with rewards that release the GIL (`RemoteReward`, GPU rewards).
    """

    full_finetune = "denoiser"

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        objective: Objective | None = None,
        regions: Regions | None = None,
        noise: NoiseBuilder | None = None,
        segmenter: Segmenter | None = None,
        lora: LoraSettings | None = None,
        group_size: int = 8,
        sample_steps: int = 10,
        sample_shift: float = 1.0,
        noise_level: float = 1.0,
        strategy: SamplingStrategy | None = None,
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
        score_chunk: int | list[int] | None = None,
        overlap_scoring: bool = False,
    ):
        if not rewards:
            raise ValueError("GRPO needs at least one reward")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group advantages, got {group_size}")
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        if isinstance(strategy, EarlyExit):
            strategy.check_schedule(sample_steps)
        check_chunking(score_chunk, overlap_scoring)
        objective = objective or FlowGRPO()
        if lora is None and objective.uses_reference:
            raise ValueError(
                "kl_beta or hold_beta > 0 needs a LoRA adapter: the reference is the "
                "adapter-off view"
            )
        objective.check_rewards(rewards)
        segmenter = segmenter or ColourSegmenter()
        super().__init__(policy, lora, segmenter, metrics, sharding)
        components = ["objective", "regions", "noise", "strategy", "segmenter", "metrics"]
        self.save_hyperparameters(ignore=["policy", "rewards", *components])
        self.automatic_optimization = False
        self.sampler = RolloutSampler(
            sample_steps, sample_shift, noise_level, noise, micro_batch_size
        )
        self.scorer = Scorer(rewards, segmenter)
        self.strategy = strategy or FullTrajectory()
        self.objective, self.regions = objective, regions
        self.update = UpdateLoop(inner_epochs, minibatches, max_grad_norm, micro_batch_size)
        self.iteration = 0  # GRPO iterations (rollout batches), whether or not they step
        self.stalls = Stalls(max_nonfinite_in_a_row, max_skipped_in_a_row)
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of every training draw (rollout noise, minibatch order), saved in
        checkpoints; seeded on first use from the run's seed plus the data-parallel rank (ranks
        explore differently; a CPU generator resumes on any device)."""
        if self._generator is None:
            seed = torch.initial_seed() + self.data_parallel_rank
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator

    @property
    def rewards(self) -> torch.nn.ModuleList:
        return self.scorer.rewards

    @property
    def capture_attention(self) -> bool:
        """Whether the sampler records the instruction-to-image attention (for regions)."""
        return self.regions is not None and self.regions.capture_attention

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
        source, instructions = batch["source"], list(batch["instruction"])
        regions, g = self.sample_regions(batch), self.hparams.group_size
        args = (self.policy, source, instructions, g, plan, generator, self.capture_attention)
        return self.sampler(*args, regions, batch.get("source_path"))

    def sample_regions(self, batch: dict) -> Tensor | None:
        """The regions [B * G, h, w] (latent resolution, in [0, 1]) handed to the noise
        builder: the `regions` component's, if any."""
        if self.regions is None:
            return None
        g = self.hparams.group_size
        return self.regions.noise_regions(self.policy, self.scorer.segmenter, batch, g)

    def observe(
        self, images: Tensor, batch: dict, repeats: int = 1, attention: Tensor | None = None
    ) -> RewardInputs:
        """What the rewards see of `images` (the scorer's view; the regions add to it)."""
        if self.regions is None:
            return self.scorer.observe(images, batch, repeats, attention=attention)
        return self.regions.observe(self.scorer, self.policy, images, batch, repeats, attention)

    def score(self, record: RolloutRecord, batch: dict) -> Scores:
        """Every reward of the rollouts, and their weighted total."""
        inputs = self.observe(record.images, batch, record.group_size, record.attention)
        return self.scorer.judge(inputs)

    def advantages(self, scores: Scores, record: RolloutRecord) -> tuple[Advantages, PolicyTargets]:
        """The objective's advantages of every rank's rewards, and this rank's targets."""
        ranks, g = Ranks(self.gather, self.data_parallel_rank), self.hparams.group_size
        adv, targets = self.objective.advantages(scores, g, ranks, self.policy)
        return adv, replace(targets, denominator=self.loss_denominator(adv))

    def loss_denominator(self, adv: Advantages) -> Tensor:
        """Valid rows of all ranks per minibatch and data-parallel rank (at least 1; a 0-d
        tensor, not read back): the gradient average of DDP and FSDP over the data-parallel
        ranks then equals the single-process mean (exact with one minibatch)."""
        world = self.data_parallel_size
        return (adv.valid.sum() / (world * self.hparams.minibatches)).clamp_min(1.0)

    # --- the loop -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        if not getattr(self, "_memory_checked", False):
            self._memory_checked = True
            check_first_rollouts(self, batch)
        clock = PhaseClock(self.device)
        chunk, overlap = self.hparams.score_chunk, self.hparams.overlap_scoring
        record, scores = sample_and_score(self, batch, chunk, overlap, clock, self._trainer)
        with clock.phase(self._trainer, "rewards"):
            adv, targets = self.advantages(scores, record)
        # the one value a step reads back before it logs, with no phase running: whether
        # any row of any rank trains (identical on every rank: computed on gathered data).
        # With nothing to train the update's forward and backward passes would all be
        # masked: they do not run, and neither the optimiser nor the LR schedule steps
        clock.announce(self._trainer, "idle")
        skipped = not bool(adv.valid.any())
        if skipped:
            zero = torch.zeros((), device=self.device)
            stats = {"optimizer_steps": zero, "nonfinite_skipped": zero}
        else:
            with clock.phase(self._trainer, "update"):
                stats = self.update(
                    self, self.objective, self.sampler, record, targets, self.generator
                )
            clock.announce(self._trainer, "idle")
        log_step(self, batch, scores, adv, stats, clock)
        self.stalls.update(skipped, scores, stats, self.gather, self.iteration, self.global_step)
        self.iteration += 1
        training_state.count_iteration(self._trainer)
        # for callbacks (lit_grpo.callbacks.RolloutImageLogger); Lightning detaches nothing here
        rollout = {"source": batch["source"], "edits": record.images, "rewards": scores.total}
        return {"rollout": {**rollout, "instruction": list(batch["instruction"])}}

    def samples_per_step(self, batch: dict) -> int:
        """Images one training step samples on this device (B x G): what
        `lit_grpo.callbacks.ThroughputMonitor` counts."""
        return batch["source"].shape[0] * self.hparams.group_size

    # --- the early-exit protocol (lit_grpo.callbacks.EarlyExitSelector) -----------------------
    @torch.no_grad()
    def exit_step_variance(self, batch: dict, candidates: list[int]) -> Tensor:
        """Mean within-group variance of the total reward when exiting at each candidate."""
        announce_phase(self._trainer, "probing exit steps")
        out = []
        for k in candidates:
            record = self.sample(batch, plan=EarlyExit(k).plan(self.hparams.sample_steps))
            groups = self.score(record, batch).total.view(-1, self.hparams.group_size)
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
    def test_step(self, batch: dict, batch_idx: int) -> None:
        evaluate_grpo_edits(self, batch, batch_idx, "test")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        edits = evaluate_grpo_edits(self, batch, batch_idx, "val")
        self.keep_grid(batch_idx, batch["source"], edits)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        h = self.hparams
        opt, sched = adamw_with_warmup(params, h.lr, h.weight_decay, h.warmup_steps)
        return [opt], [sched]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        training_state.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        training_state.load(self, checkpoint)
