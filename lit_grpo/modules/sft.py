"""SFT warm-start: the flow-matching loss on paired edits (Talk2Move's first stage).

    loss = || v_theta(x_sigma, sigma, cond) - (noise - x0_target) ||^2,
    x_sigma = (1 - sigma) * x0_target + sigma * noise,  cond = (source image, instruction)

LoRA on the denoiser (`lora:` set) or a full fine-tune (`lora: null`, what the embedded
editor uses to learn ShapeWorld from scratch).

Ours, not Talk2Move's: `edit_region_weight` w > 1 weighs the squared error on the latent
positions of the edited object (its mask before and after the edit, where the batch has
them) w times the rest, normalised so the loss stays a weighted mean. On ShapeWorld the
object covers a few percent of the image, so under a plain mean the edit itself is a small
part of the loss, and the copy of the scene around it the rest (docs/benchmarks.md,
"rotation"). Validation reports the same loss on fixed,
seeded noise and sigmas (comparable across runs) and logs a grid of ODE-sampled edits.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_grpo.metrics import EditMetrics
from lit_grpo.modules.evaluation import update_edit_metrics
from lit_grpo.modules.sharding import ShardingSettings
from lit_grpo.modules.stage import PolicyStage
from lit_grpo.perception.segmenters import Segmenter
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.sampling import add_noise, randn_like, sample_sigmas, velocity_target


class SFTModule(PolicyStage):
    """Supervised flow-matching fine-tuning of an `EditPolicy` on (source, instruction, target).

    Args:
        policy: the editing policy (any `EditPolicy`, chosen by class_path).
        lora: a LoRA adapter to train; None trains every parameter.
        lr, weight_decay: AdamW settings.
        warmup_steps: linear warm-up, then cosine decay to 10% of lr over the run.
        sigma_sampling: "logit_normal" (SD3) or "uniform" training noise levels.
        sample_steps, sample_shift: the ODE sampler used for the validation grid.
        grid_size: how many validation edits the image grid shows.
        edit_region_weight: the loss weight of the edited object's latent positions
            relative to the rest (1: a plain mean; needs `mask_before` / `mask_after` in the
            batch otherwise). Ours; see above.
        segmenter: finds the instructed object for the edit metrics (ShapeWorld colours).
        metrics: the edit metrics of the ODE edits of validation and test
            (`EditMetrics()` by default).
        sharding: FSDP2 settings, used under `ModelParallelStrategy` only (it shards the
            denoiser; train a LoRA adapter there: the text encoder is not sharded).

    Every training and validation row needs a target image: a data module that can check
    that up front reads `needs_targets` (`JsonlDataModule` makes such rows bad rows).
    """

    needs_targets = True

    def __init__(
        self,
        policy: EditPolicy,
        lora: LoraSettings | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        sigma_sampling: str = "logit_normal",
        sample_steps: int = 10,
        sample_shift: float = 1.0,
        grid_size: int = 8,
        edit_region_weight: float = 1.0,
        segmenter: Segmenter | None = None,
        metrics: EditMetrics | None = None,
        sharding: ShardingSettings | None = None,
    ):
        super().__init__(policy, lora, segmenter, metrics, sharding)
        self.save_hyperparameters(ignore=["policy", "segmenter", "metrics"])
        sample_sigmas(1, kind=sigma_sampling)  # an unknown kind fails at construction
        if not edit_region_weight >= 1.0:
            raise ValueError(f"edit_region_weight must be >= 1, got {edit_region_weight}")

    @property
    def eval_schedule(self) -> tuple[int, float]:
        return self.hparams.sample_steps, self.hparams.sample_shift

    def flow_matching_loss(
        self, batch: dict, generator: torch.Generator | None = None, sigma: Tensor | None = None
    ) -> Tensor:
        if "target" not in batch:
            raise ValueError(_no_targets(batch))
        source, target = batch["source"], batch["target"]
        cond = self.policy.encode_condition(source, batch["instruction"], batch.get("source_path"))
        x0 = self.policy.encode_images(target)
        noise = randn_like(x0, generator)
        if sigma is None:
            sigma = sample_sigmas(x0.shape[0], generator, self.hparams.sigma_sampling).to(x0)
        v = self.policy.velocity(add_noise(x0, noise, sigma), sigma, cond)
        weight = self.hparams.get("edit_region_weight", 1.0)
        if weight == 1.0:
            return F.mse_loss(v.float(), velocity_target(x0, noise).float())
        return region_weighted_mse(
            v.float(), velocity_target(x0, noise).float(), edit_region(batch, x0), weight
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.flow_matching_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["source"].shape[0])
        return loss

    def _fixed_noise_loss(self, batch: dict, batch_idx: int) -> Tensor:
        n = batch["source"].shape[0]
        # Fixed noise and evenly spread sigmas: the number moves only when the model does.
        gen = torch.Generator().manual_seed(1234 + batch_idx)
        sigma = ((torch.arange(n) + 0.5) / n).to(self.device)
        return self.flow_matching_loss(batch, gen, sigma)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = batch["source"].shape[0]
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        edits = self.edit(
            batch["source"], batch["instruction"], batch_idx, batch.get("source_path")
        )
        update_edit_metrics(self, batch, edits)
        self.keep_grid(batch_idx, batch["source"], batch["target"], edits)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("test/loss", loss, batch_size=batch["source"].shape[0], sync_dist=True)
        edits = self.edit(
            batch["source"], batch["instruction"], batch_idx, batch.get("source_path")
        )
        update_edit_metrics(self, batch, edits)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def edit_region(batch: dict, latents: Tensor) -> Tensor:
    """[N, h, w] bool: latent positions that touch the edited object before or after the edit
    (its pixel masks max-pooled to the latent grid)."""
    missing = [k for k in ("mask_before", "mask_after") if k not in batch]
    if missing:
        raise ValueError(
            f"edit_region_weight needs the edited object's masks, and the batch has no "
            f"{' or '.join(missing)}; set model.init_args.edit_region_weight: 1"
        )
    union = (batch["mask_before"].bool() | batch["mask_after"].bool()).float()[:, None]
    return F.adaptive_max_pool2d(union, latents.shape[-2:])[:, 0] > 0


def region_weighted_mse(pred: Tensor, target: Tensor, region: Tensor, weight: float) -> Tensor:
    """Mean squared error with the `region` positions [N, h, w] weighted `weight` times the
    rest: sum(w_p * err_p) / sum(w_p) over every element of `pred` [N, C, h, w]."""
    w = 1.0 + (weight - 1.0) * region.to(pred.dtype)[:, None]  # [N, 1, h, w]
    w = w.expand_as(pred)
    return ((pred - target).square() * w).sum() / w.sum()


def _no_targets(batch: dict) -> str:
    rows = (batch.get("missing") or {}).get("target")
    where = f"rows without one: {', '.join(rows)}" if rows else "the batch has no 'target' key"
    return (
        f"SFT trains on target images (the edited image of each row), and {where}. Give every "
        "row a 'target', leave those rows out (data.init_args.on_bad_row: skip does, for "
        "JsonlDataModule), or train on single-sided data with a GRPO stage, which needs none"
    )
