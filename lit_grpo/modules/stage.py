"""What every training stage does with its policy, in one place (SFT and the GRPO stages).

`PolicyStage` holds the policy and decides what trains (a LoRA adapter, or the network
without one), owns the evaluation pieces (segmenter, edit metrics), samples the evaluation
edits (ODE, seeded), and writes the self-describing policy into every checkpoint. Subclasses
add their loss and their optimiser.

Under Lightning's `ModelParallelStrategy` the stage shards its policy's denoiser with FSDP2
in `configure_model` (`lit_grpo.modules.sharding`); the data-parallel rank and size then
come from the device mesh (`data_parallel_rank`, `data_parallel_size`), and `gather`
collects a tensor from the data-parallel ranks. Under DDP or on one process they are the
trainer's global rank and world size. See docs/scaling.md.
"""

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from lit_grpo.loggers import log_image
from lit_grpo.metrics import EditMetrics
from lit_grpo.modules.evaluation import report_edit_metrics
from lit_grpo.modules.grids import edit_grid
from lit_grpo.modules.sharding import ShardingSettings, is_sharded, shard_policy
from lit_grpo.perception.segmenters import ColourSegmenter, Segmenter
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.policies.weights import (
    IncompatibleWeightsError,
    adapter_checkpoint_entry,
    policy_checkpoint_entry,
    sharded_checkpoint_entry,
)


class PolicyStage(L.LightningModule):
    """Base of the stages. `full_finetune` says what trains without LoRA: "all" parameters
    or the "denoiser" alone (the condition encoders stay frozen). `sharding` applies only
    under `ModelParallelStrategy` (None: `ShardingSettings()`, bf16 compute)."""

    full_finetune = "all"

    def __init__(
        self,
        policy: EditPolicy,
        lora: LoraSettings | None,
        segmenter: Segmenter | None = None,
        metrics: EditMetrics | None = None,
        sharding: ShardingSettings | None = None,
    ):
        super().__init__()
        self.policy = policy
        policy.prepare_training(lora, full=self.full_finetune)
        self._segmenter = segmenter or ColourSegmenter()
        self.edit_metrics = metrics or EditMetrics()
        self.sharding = sharding or ShardingSettings()
        self._grid: list[Tensor] | None = None  # the first validation batch's grid columns

    # --- scale-out: sharding, data-parallel ranks -------------------------------------------
    def configure_model(self) -> None:
        """Shard the policy (FSDP2) when the trainer's strategy is `ModelParallelStrategy`;
        nothing otherwise. Lightning calls this before every fit / validate / test, so a
        policy sharded already is left as it is."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        if is_sharded(self.policy.denoiser):
            return
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                "lit_grpo shards with FSDP2 over data-parallel ranks only: set "
                "trainer.strategy.init_args.tensor_parallel_size to 1 (got "
                f"{mesh['tensor_parallel'].size()})"
            )
        shard_policy(self.policy, mesh["data_parallel"], self.sharding)

    @property
    def is_sharded(self) -> bool:
        return is_sharded(self.policy.denoiser)

    @property
    def data_parallel_rank(self) -> int:
        """This process's rank among the data-parallel replicas (the device mesh's under
        `ModelParallelStrategy`, the trainer's global rank otherwise; 0 without a trainer)."""
        if self.device_mesh is not None:
            return self.device_mesh["data_parallel"].get_local_rank()
        return self.trainer.global_rank if self._trainer is not None else 0

    @property
    def data_parallel_size(self) -> int:
        if self.device_mesh is not None:
            return self.device_mesh["data_parallel"].size()
        return self.trainer.world_size if self._trainer is not None else 1

    def gather(self, tensor: Tensor) -> Tensor:
        """Every data-parallel rank's `tensor` stacked in rank order ([world, ...]); the
        tensor itself on one process. A collective: every rank must call it."""
        if self.device_mesh is not None:
            parts = [torch.empty_like(tensor) for _ in range(self.data_parallel_size)]
            dist.all_gather(
                parts, tensor.contiguous(), group=self.device_mesh["data_parallel"].get_group()
            )
            return torch.stack(parts)
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.all_gather(tensor)

    @property
    def segmenter(self) -> Segmenter:
        return self._segmenter

    @property
    def eval_schedule(self) -> tuple[int, float]:
        """(ODE steps, shift) of the evaluation sampler."""
        raise NotImplementedError

    @property
    def lora_module(self) -> torch.nn.Module | None:
        """The module carrying the LoRA adapter (lit_grpo.callbacks.LoraExporter's protocol)."""
        return self.policy.denoiser if self.policy.has_lora else None

    def edit(
        self, source: Tensor, instructions: list[str], seed: int = 0, keys: list[str] | None = None
    ) -> Tensor:
        """ODE-sampled edits [N, 3, H, W] in [0, 1] with seeded noise (the evaluation sampler);
        `keys` name the sources (a batch's `source_path`) for the policy's caches."""
        steps, shift = self.eval_schedule
        gen = torch.Generator().manual_seed(seed)
        return self.policy.edit(source, instructions, steps, shift, gen, keys)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        """ODE edits [N, 3, H, W] in [0, 1] of the batch's sources and instructions."""
        return self.edit(batch["source"], batch["instruction"], batch_idx, batch.get("source_path"))

    def keep_grid(self, batch_idx: int, *columns: Tensor) -> None:
        """Keep the first `grid_size` rows of each column [N, 3, H, W] of the first validation
        batch for the `val/edits` image (`on_validation_epoch_end`)."""
        if batch_idx == 0:
            self._grid = [c[: self.hparams.grid_size] for c in columns]

    def on_validation_epoch_end(self) -> None:
        report_edit_metrics(self, "val")
        if self._grid is not None and not self.trainer.sanity_checking:
            log_image(self.trainer, "val/edits", edit_grid(*self._grid), step=self.global_step)
        self._grid = None

    def on_test_epoch_end(self) -> None:
        report_edit_metrics(self, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.is_sharded:
            # the weights are in the distributed checkpoint's shards: no full copy per save
            # (LoraExporter writes the gathered adapter); the entry still names the policy
            checkpoint["lit_grpo_policy"] = sharded_checkpoint_entry(self.policy)
            return
        if self.policy.frozen_from_source:
            # the frozen transformer and VAE are the pretrained folder's: not saved, and
            # reloaded from the policy as built (`load_state_dict`); the entry names the
            # folder and holds the adapter instead of a merged copy
            frozen = {f"policy.{k}" for k in self.policy.source_state_keys()}
            for key in ("state_dict", "current_model_state"):  # the latter: WeightAveraging's
                if key in checkpoint:
                    checkpoint[key] = {k: v for k, v in checkpoint[key].items() if k not in frozen}
            checkpoint["lit_grpo_policy"] = adapter_checkpoint_entry(
                self.policy, checkpoint["state_dict"]
            )
            return
        checkpoint["lit_grpo_policy"] = policy_checkpoint_entry(
            self.policy, checkpoint["state_dict"]
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, except that a policy whose frozen weights come from its pretrained
        folder (`frozen_from_source`) takes those from itself as built when the state lacks
        them (its checkpoints do not hold them); any other missing key is still an error."""
        if self.policy.frozen_from_source:
            live = self.policy.state_dict(prefix="policy.")
            frozen = {f"policy.{k}" for k in self.policy.source_state_keys()}
            state_dict = {**{k: live[k] for k in frozen if k not in state_dict}, **state_dict}
            missing = [k for k in live if k not in state_dict]
            if strict and missing:
                raise IncompatibleWeightsError(
                    f"the checkpoint lacks {len(missing)} weights of the policy that its "
                    f"pretrained folder does not hold (e.g. {missing[0]}): it was written by "
                    "a run with other lora settings; resume with that run's lora settings"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
