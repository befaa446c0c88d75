"""What every training stage does with its policy, in one place (SFT and the GRPO stages).

`PolicyStage` holds the policy and decides what trains (a LoRA adapter, or the network
without one), owns the evaluation pieces (segmenter, edit metrics), samples the evaluation
edits (ODE, seeded), and writes the self-describing policy into every checkpoint. Subclasses
add their loss and their optimiser.
"""

import lightning as L
import torch
from torch import Tensor

from lit_grpo.metrics import EditMetrics
from lit_grpo.modules.evaluation import report_edit_metrics
from lit_grpo.perception.segmenters import ColourSegmenter, Segmenter
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.policies.weights import policy_checkpoint_entry


class PolicyStage(L.LightningModule):
    """Base of the stages. `full` says what trains without LoRA: "all" parameters or the
    "denoiser" alone (the condition encoders stay frozen)."""

    full_finetune = "all"

    def __init__(
        self,
        policy: EditPolicy,
        lora: LoraSettings | None,
        segmenter: Segmenter | None = None,
        metrics: EditMetrics | None = None,
    ):
        super().__init__()
        self.policy = policy
        policy.prepare_training(lora, full=self.full_finetune)
        self._segmenter = segmenter or ColourSegmenter()
        self.edit_metrics = metrics or EditMetrics()

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

    def edit(self, source: Tensor, instructions: list[str], seed: int = 0) -> Tensor:
        """ODE-sampled edits [N, 3, H, W] in [0, 1] with seeded noise (the evaluation sampler)."""
        steps, shift = self.eval_schedule
        gen = torch.Generator().manual_seed(seed)
        return self.policy.edit(source, instructions, steps, shift, gen)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        """ODE edits [N, 3, H, W] in [0, 1] of the batch's sources and instructions."""
        return self.edit(batch["source"], batch["instruction"], seed=batch_idx)

    def on_test_epoch_end(self) -> None:
        report_edit_metrics(self, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_grpo_policy"] = policy_checkpoint_entry(
            self.policy, checkpoint["state_dict"]
        )
