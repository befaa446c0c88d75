"""Log what the policy sampled: source | G edits per condition, each edit captioned with its reward.

The protocol a LightningModule implements to use it: `training_step` returns a dict whose
`"rollout"` entry holds

    source:      [B, 3, H, W] the conditions' source images, values in [0, 1]
    edits:       [B, G, 3, H, W] (or [B * G, 3, H, W], groups contiguous) the sampled edits
    rewards:     [B, G] (or [B * G]) each edit's reward, NaN where it could not be scored
    instruction: optional list of B strings, written above each row

Lightning hands that dict to `on_train_batch_end` as `outputs` under automatic and manual
optimisation alike (automatic optimisation also needs the usual `"loss"` key). Nothing else of
the module is used. The image goes to every logger of the trainer that can store images
(MLflow, TensorBoard, W&B; a PNG beside the metrics for CSV), through `lit_grpo.loggers`.
"""

import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


class RolloutImageLogger(Callback):
    """Every `every_n_steps` optimiser steps, log a grid of the current rollouts.

    Args:
        every_n_steps: log at the first step and then whenever N more optimiser steps have
            passed (a GRPO step may take several optimiser steps).
        max_conditions: rows in the grid (the first B conditions of the batch).
        scale: nearest-neighbour upscaling so 32 px edits stay readable.
        key: the image's name in the logger.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_conditions: int = 4,
        scale: int = 4,
        key: str = "rollouts",
    ):
        if every_n_steps < 1 or max_conditions < 1 or scale < 1:
            raise ValueError("every_n_steps, max_conditions and scale must be >= 1")
        self.every_n_steps, self.max_conditions, self.scale, self.key = (
            every_n_steps,
            max_conditions,
            scale,
            key,
        )
        self._last_logged: int | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._last_logged is not None and step - self._last_logged < self.every_n_steps:
            return
        rollout = outputs.get("rollout") if isinstance(outputs, dict) else None
        if rollout is None:
            raise TypeError(
                f"RolloutImageLogger needs {type(pl_module).__name__}.training_step to return "
                "{'rollout': {'source', 'edits', 'rewards'}}; see lit_grpo/callbacks/rollout_images.py"
            )
        self._last_logged = step
        if not trainer.is_global_zero or not trainer.loggers:
            return
        from lit_grpo.loggers import log_image

        image = rollout_grid(
            rollout["source"],
            rollout["edits"],
            rollout["rewards"],
            rollout.get("instruction"),
            scale=self.scale,
            max_rows=self.max_conditions,
        )
        log_image(trainer, self.key, image, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged": self._last_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged = state_dict.get("last_logged")


def rollout_grid(
    source: Tensor,
    edits: Tensor,
    rewards: Tensor,
    instructions: list[str] | None = None,
    scale: int = 4,
    max_rows: int | None = None,
) -> np.ndarray:
    """uint8 [H', W', 3]: one row per condition, source | edits in sampling order, each edit
    captioned with its reward (best of the row in green, worst in red)."""
    from PIL import Image, ImageDraw, ImageFont

    n = source.shape[0]
    edits = edits.detach().float().cpu()
    g = edits.shape[1] if edits.dim() == 5 else edits.shape[0] // n
    edits = edits.reshape(n, g, *edits.shape[-3:])
    rewards = rewards.detach().float().cpu().reshape(n, g)
    b = min(n, max_rows) if max_rows else n
    source, edits, rewards = source[:b], edits[:b], rewards[:b]
    h, w = source.shape[-2] * scale, source.shape[-1] * scale
    font = ImageFont.load_default()
    text_h = 14
    pad = 4
    head = text_h if instructions else 0
    row_h = head + h + text_h + pad
    canvas = Image.new("RGB", ((g + 1) * (w + pad) + pad, b * row_h + pad), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(img: Tensor, x: int, y: int) -> None:
        arr = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        canvas.paste(Image.fromarray(arr.permute(1, 2, 0).numpy()), (x, y))

    for i in range(b):
        y = pad + i * row_h
        if instructions:
            draw.text((pad, y), str(instructions[i])[: 12 * (g + 1)], fill="black", font=font)
        paste(source[i], pad, y + head)
        draw.text((pad, y + head + h + 1), "source", fill="black", font=font)
        finite = rewards[i][torch.isfinite(rewards[i])]
        best = finite.max().item() if finite.numel() else math.nan
        worst = finite.min().item() if finite.numel() else math.nan
        for j in range(g):
            x = pad + (j + 1) * (w + pad)
            paste(edits[i, j], x, y + head)
            r = rewards[i, j].item()
            colour = "black"
            if finite.numel() > 1 and best > worst:
                colour = "green" if r == best else "red" if r == worst else "black"
            caption = "nan" if math.isnan(r) else f"{r:.3f}"
            draw.text((x, y + head + h + 1), caption, fill=colour, font=font)
    return np.asarray(canvas)
