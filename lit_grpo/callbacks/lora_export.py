"""Write the LoRA adapter as a small .safetensors file every time a checkpoint is saved.

A full checkpoint carries the frozen base model and the optimiser state; the adapter alone is
what users share, merge, or load into another pipeline. The file uses peft's own key layout
(`blocks.0.attn.to_q.lora_A.weight`: the adapter name dropped, as
`peft.get_peft_model_state_dict` writes it), so `peft.set_peft_model_state_dict` (or
`lit_grpo.policies.lora.load_lora`) restores it into the same model with the same adapter
settings, which the file's metadata records.

The protocol (optional): a LightningModule may expose `lora_module`, the sub-module that
carries the peft adapter (lit_grpo stages: the policy's denoiser); keys are then relative to
it. Without it, every `lora_` tensor of the module is exported under its full name. The
tensors are read from the checkpoint being saved (not the live module), so what is exported
is exactly what the checkpoint holds.

With `diffusers_prefix` (e.g. "transformer"), the file is in the layout diffusers' pipelines
load with `load_lora_weights`: every key under `<prefix>.`, and the adapter config (rank,
alpha, targets) in the `lora_adapter_metadata` entry of the safetensors metadata.

Under FSDP2 (Lightning's `ModelParallelStrategy`) the checkpoint holds each rank's shards
(DTensors): every rank gathers the adapter's tensors, and only those, then rank 0 writes the
file. The frozen base weights are never gathered.
"""

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class LoraExporter(Callback):
    """At each checkpoint save, write `<dirpath>/lora-step=<global step>.safetensors`.

    Args:
        dirpath: where to write; default `lora/` beside the checkpoint callback's files
            (or under the trainer's `default_root_dir` without one).
        half: store float16 (half the size).
        diffusers_prefix: write diffusers' LoRA layout under this component name
            ("transformer" for FLUX.1-Kontext and Qwen-Image-Edit pipelines); None: peft's.
    """

    def __init__(
        self, dirpath: str | None = None, half: bool = False, diffusers_prefix: str | None = None
    ):
        self.dirpath = dirpath
        self.half = half
        self.diffusers_prefix = diffusers_prefix
        self._last_step: int | None = None

    def _dir(self, trainer: Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath) / "lora"
        return Path(trainer.default_root_dir) / "lora"

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # every rank builds the checkpoint (and gathers sharded tensors); one writes
        path = self._dir(trainer) / f"lora-step={trainer.global_step:06d}.safetensors"
        if self._last_step == trainer.global_step:
            return  # a "last" and a "best" checkpoint of the same step share one export
        tensors, metadata = lora_tensors(pl_module, checkpoint["state_dict"])
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if not tensors:
            raise ValueError(
                f"LoraExporter: {type(pl_module).__name__} has no LoRA parameters "
                "(no 'lora_' tensors in its state dict); train with a LoRA adapter or drop "
                "the callback"
            )
        if self.half:
            tensors = {k: v.half() for k, v in tensors.items()}
        if self.diffusers_prefix:
            tensors, metadata = diffusers_layout(tensors, metadata, self.diffusers_prefix)
        metadata["global_step"] = str(trainer.global_step)
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)


def lora_tensors(pl_module: LightningModule, state_dict: dict) -> tuple[dict, dict[str, str]]:
    """(adapter tensors in peft's key layout, safetensors metadata with the adapter config).
    Sharded (DTensor) values are gathered whole: a collective, so every rank calls this."""
    target = getattr(pl_module, "lora_module", None)
    prefix = ""
    if target is not None:
        prefix = next((f"{n}." for n, m in pl_module.named_modules() if m is target), "")
    tensors = {}
    for key, value in state_dict.items():
        if "lora_" not in key or not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        for adapter in ("lora_A", "lora_B"):  # peft: drop the adapter name ("default")
            name = name.replace(f".{adapter}.default.", f".{adapter}.")
        tensors[name] = _whole(value.detach()).cpu().contiguous()
    metadata = {"format": "pt", "lit_grpo.lora_prefix": prefix}
    config = getattr(target if target is not None else pl_module, "peft_config", None)
    if isinstance(config, dict) and "default" in config:
        c = config["default"]
        metadata["lit_grpo.lora"] = json.dumps(
            {
                "rank": c.r,
                "alpha": c.lora_alpha,
                "target_modules": sorted(c.target_modules),
                "dropout": c.lora_dropout,
            }
        )
    return tensors, metadata


def diffusers_layout(tensors: dict, metadata: dict, prefix: str) -> tuple[dict, dict[str, str]]:
    """peft-layout adapter tensors and `lora_tensors`' metadata -> diffusers' LoRA layout."""
    if "lit_grpo.lora" not in metadata:
        raise ValueError(
            "LoraExporter: the module's adapter config (peft_config) was not found, which "
            "diffusers' layout needs; drop diffusers_prefix or expose `lora_module`"
        )
    settings = json.loads(metadata["lit_grpo.lora"])
    config = {
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "target_modules": sorted({k.split(".lora_")[0] for k in tensors}),  # the layers
        "lora_dropout": settings["dropout"],
    }
    meta = {f"{prefix}.{k}": v for k, v in config.items()}
    metadata = {**metadata, "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    return {f"{prefix}.{k}": v for k, v in tensors.items()}, metadata


def _whole(value):
    """The full tensor of a sharded DTensor (gathered over its mesh), a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return value
    mesh = value.device_mesh
    if value.to_local().device.type != mesh.device_type:
        # a checkpoint's shards offloaded to the CPU: gather them on the mesh's device
        local = value.to_local().to(mesh.device_type)
        value = DTensor.from_local(
            local, mesh, value.placements, shape=value.shape, stride=value.stride()
        )
    return value.full_tensor()
