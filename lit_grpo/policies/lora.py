"""LoRA through peft for any `nn.Module` (the tiny editor and diffusers transformers alike).

peft is imported lazily: it pulls in transformers, which costs seconds at start-up.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraSettings:
    """A LoRA adapter.

    rank:            r of the low-rank update
    alpha:           scale numerator (update scaled by alpha / rank)
    target_modules:  module names (suffixes) that get an adapter; the policy's default if empty
    dropout:         LoRA dropout
    init_from:       an adapter file written by `LoraExporter` to start from (a later stage
                     continuing a run's adapter, e.g. one trained under FSDP2); its rank,
                     alpha and targets must be these
    """

    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=list)
    dropout: float = 0.0
    init_from: str | None = None


# Stages keep their LoraSettings in the checkpoint's hyper-parameters; Lightning and lit_grpo
# load checkpoints with weights_only=True, which refuses unknown classes.
torch.serialization.add_safe_globals([LoraSettings])


def add_lora(module: nn.Module, settings: LoraSettings, default_targets: list[str] | None = None):
    from peft import LoraConfig, inject_adapter_in_model

    targets = settings.target_modules or default_targets or getattr(module, "lora_targets", None)
    if not targets:
        raise ValueError(
            f"no LoRA target modules for {type(module).__name__}: set lora.target_modules"
        )
    _check_targets(module, list(targets))
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        init_lora_weights=True,  # B = 0: step 0 of training is exactly the loaded model
    )
    try:
        inject_adapter_in_model(config, module)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"LoRA targets {list(targets)} not found; linear layers here: {names}"
        ) from err
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    if settings.init_from:
        stored = lora_file_settings(settings.init_from)
        mine = (settings.rank, settings.alpha, sorted(config.target_modules))
        theirs = (stored.rank, stored.alpha, sorted(stored.target_modules))
        if mine != theirs:
            raise ValueError(
                f"lora.init_from {settings.init_from} holds an adapter of rank {theirs[0]}, "
                f"alpha {theirs[1]}, targets {theirs[2]}; lora asks for rank {mine[0]}, alpha "
                f"{mine[1]}, targets {mine[2]}: set lora's rank, alpha and target_modules to "
                "the file's"
            )
        load_lora(module, settings.init_from)


def _check_targets(module: nn.Module, targets: list[str]) -> None:
    """Every target must name a module (peft's rule for a list: the module's dotted name is
    the target or ends with `.target`); peft itself only refuses a list that matches
    nothing, and would train fewer layers than asked, silently."""
    from lit_grpo.checks import ConfigError

    names = [n for n, _ in module.named_modules()]
    absent = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if absent:
        linear = sorted(
            {n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"lora.target_modules: {absent} name no module of {type(module).__name__} (a "
            "target matches a module whose dotted name ends with it, e.g. 'to_q' or "
            f"'ff.net.2'); its linear layers end in {linear}"
        )


def has_lora(module: nn.Module) -> bool:
    return any("lora_A" in name for name, _ in module.named_parameters())


def _tuner_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run `module` as its base model; the adapter is back on afterwards, even on error."""
    layers = _tuner_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(module: nn.Module) -> dict:
    """Only the adapter weights (what a LoRA export or a small checkpoint needs)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if "lora_" in k}


def merged_state_dict(module: nn.Module) -> dict:
    """State dict with adapters folded into the base weights, under the base layers' names.

    The base weights are restored bit for bit afterwards: peft's `unmerge` subtracts the
    delta again, and (w + d) - d is not w in floating point, so every checkpoint (which
    calls this) used to nudge the frozen weights of the run that wrote it.
    """
    layers = _tuner_layers(module) if has_lora(module) else []
    base = [p for layer in layers for p in layer.get_base_layer().parameters(recurse=False)]
    originals = [p.detach().clone() for p in base]
    for layer in layers:
        layer.merge()
    try:
        state = {}
        for key, value in module.state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value.detach().clone()
        return state
    finally:
        for layer in layers:
            layer.unmerge()  # peft's bookkeeping of merged adapters
        with torch.no_grad():
            for p, original in zip(base, originals):
                p.copy_(original)


def peft_settings(module: nn.Module) -> dict:
    """The adapter `module` carries, as `LoraSettings` fields (rank, alpha, targets, dropout)."""
    c = module.peft_config["default"]
    return {
        "rank": c.r,
        "alpha": c.lora_alpha,
        "target_modules": sorted(c.target_modules),
        "dropout": c.lora_dropout,
    }


def merge_lora_tensors(module: nn.Module, tensors: dict, rank: int, alpha: float) -> None:
    """Fold adapter `tensors` (peft's state-dict keys `<layer>.lora_A.default.weight` and
    `lora_B`) into the linear layers of `module`, which carries no adapter: `W += (alpha /
    rank) B A`, the same operations as peft's `merge`, so the result equals what
    `merged_state_dict` gives on the adapted module."""
    layers = sorted({k.split(".lora_")[0] for k in tensors})
    for name in layers:
        a = tensors.get(f"{name}.lora_A.default.weight")
        b = tensors.get(f"{name}.lora_B.default.weight")
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            layer = None
        if a is None or b is None or not isinstance(layer, nn.Linear):
            raise ValueError(
                f"adapter layer {name!r}: expected lora_A and lora_B weights of a linear "
                f"layer of {type(module).__name__}"
            )
        if layer.weight.shape != (b.shape[0], a.shape[1]):
            raise ValueError(
                f"adapter layer {name!r} is {b.shape[0]}x{a.shape[1]}, the layer "
                f"{tuple(layer.weight.shape)}"
            )
        with torch.no_grad():
            delta = (b.to(layer.weight.device) @ a.to(layer.weight.device)) * (alpha / rank)
            layer.weight.data += delta


def lora_file_settings(path: str) -> LoraSettings:
    """The adapter settings a `LoraExporter` file records in its metadata."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"LoRA adapter file not found: {path}. Pass a lora-step=N.safetensors written by "
            "LoraExporter (<run>/checkpoints/lora/)"
        )
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "lit_grpo.lora" not in meta:
        raise ValueError(f"{path} has no 'lit_grpo.lora' metadata: not a LoraExporter file")
    return LoraSettings(**json.loads(meta["lit_grpo.lora"]))


def load_lora(module: nn.Module, path: str) -> LoraSettings:
    """Load an adapter written by `lit_grpo.callbacks.LoraExporter` into `module` (the same
    module it was trained on, e.g. `policy.denoiser`); adds the adapter first if needed."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    settings = lora_file_settings(path)
    if not has_lora(module):
        add_lora(module, settings)
    result = set_peft_model_state_dict(module, load_file(path))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(
            f"{path} does not fit {type(module).__name__}: unexpected keys {unexpected[:4]}"
        )
    return settings


def save_diffusers_lora_tensors(
    tensors: dict, settings: LoraSettings, path, prefix: str = "transformer"
) -> None:
    """Write adapter tensors in peft's layout (`<layer>.lora_A.weight`, no adapter name) as
    a file diffusers' `load_lora_weights` loads: every key under `<prefix>.`, and the adapter
    config (peft's field names under `<prefix>.`, in the `lora_adapter_metadata` entry of
    the safetensors metadata), so rank and alpha load exactly instead of being guessed. The
    targets are the layers the tensors name, whatever `settings.target_modules` says (empty
    there means the policy's defaults)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if not tensors:
        raise ValueError("no LoRA tensors to export")
    layers = sorted({k.split(".lora_")[0] for k in tensors})
    config = {
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "target_modules": layers,
        "lora_dropout": settings.dropout,
    }
    meta = {f"{prefix}.{k}": v for k, v in config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    out = {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)


def save_diffusers_lora(
    module: nn.Module, path, prefix: str = "transformer", dtype: torch.dtype | None = None
) -> None:
    """`save_diffusers_lora_tensors` of the adapter `module` (a diffusers transformer)
    carries: what `FluxKontextPipeline` / `QwenImageEditPipeline.load_lora_weights` load."""
    from peft import get_peft_model_state_dict

    config = getattr(module, "peft_config", {}).get("default")
    if config is None or not has_lora(module):
        raise ValueError(f"{type(module).__name__} carries no LoRA adapter to export")
    settings = LoraSettings(config.r, config.lora_alpha, [], config.lora_dropout)
    state = get_peft_model_state_dict(module)
    tensors = {k: v.to(dtype or v.dtype) for k, v in state.items()}
    save_diffusers_lora_tensors(tensors, settings, path, prefix)
