"""Local diffusers folders: every file a backbone needs, checked before any weight is read.

A folder has the layout `save_pretrained` writes and Hub snapshots hold: `model_index.json`
and one sub-folder per component (`transformer/`, `vae/`, `text_encoder*/`, `tokenizer*/`,
`processor/`, `scheduler/`). A policy names the components it loads (`Component`), and
`DiffusersFolder` checks all of them at once: a missing sub-folder, config, tokenizer file
or weights file, and a shard that a sharded weights index lists but the folder lacks (an
interrupted download), are named together in one `ModelFilesError` (a `ConfigError`, so
the CLI prints it in one line). Nothing is downloaded: every load passes
`local_files_only=True`, and `HF_HUB_OFFLINE=1` is set unless the user set it.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lit_grpo.checks import ConfigError

# a component's weights: one file, or a sharded index and every shard it lists
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class ModelFilesError(ConfigError):
    """A local model folder lacks folders or files the policy needs (one line, all named)."""


@dataclass(frozen=True)
class Component:
    """A sub-folder a policy loads.

    folder:  its name in the model folder (`transformer`, `tokenizer_2`, ...)
    holds:   what it is, for the error (`FluxTransformer2DModel`, `T5's tokenizer`)
    weights: the weights file names it may have (each also as a sharded
             `<name>.index.json`); empty for a tokenizer or processor
    files:   other files it needs, as groups of alternatives: for every group, all files
             of at least one alternative must be there
    """

    folder: str
    holds: str
    weights: tuple[str, ...] = ()
    files: tuple[tuple[tuple[str, ...], ...], ...] = ()


def diffusers_model(folder: str, holds: str) -> Component:
    """A diffusers model's sub-folder: `config.json` and its weights."""
    return Component(folder, holds, DIFFUSERS_WEIGHTS, ((("config.json",),),))


def transformers_model(folder: str, holds: str) -> Component:
    """A transformers model's sub-folder: `config.json` and its weights."""
    return Component(folder, holds, TRANSFORMERS_WEIGHTS, ((("config.json",),),))


def missing_files(root: Path, components: Sequence[Component]) -> list[str]:
    """What `root` lacks of `components`, one phrase per missing thing (empty: complete)."""
    missing = []
    for part in components:
        folder = root / part.folder
        if not folder.is_dir():
            missing.append(f"{part.folder}/ ({part.holds})")
            continue
        for group in part.files:
            if not any(all((folder / f).is_file() for f in option) for option in group):
                options = [" and ".join(f"{part.folder}/{f}" for f in option) for option in group]
                missing.append(f"{' or '.join(options)} ({part.holds})")
        if part.weights:
            missing += _missing_weights(folder, part)
    return missing


def _missing_weights(folder: Path, part: Component) -> list[str]:
    for name in part.weights:
        if (folder / name).is_file():
            return []
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                return [f"a readable {part.folder}/{index.name} ({type(err).__name__}: {err})"]
            absent = [s for s in shards if not (folder / s).is_file()]
            return [f"{part.folder}/{s} (listed in {part.folder}/{index.name})" for s in absent]
    first = part.weights[0]
    return [f"{part.folder}/{first} or a sharded {first}.index.json ({part.holds}'s weights)"]


class DiffusersFolder:
    """A local diffusers folder holding every file of `components` (checked on construction;
    `what` names the policy in errors)."""

    def __init__(self, path: str, components: Sequence[Component], what: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never the Hub
        self.path = Path(path).expanduser()
        self.what = what
        if not self.path.is_dir():
            raise ModelFilesError(
                f"{what}: pretrained folder not found: {self.path}. Point `pretrained` at a "
                "local diffusers folder (the Hub snapshot, e.g. from `huggingface-cli "
                "download` on a machine with network access; docs/backbones.md lists its files)"
            )
        missing = missing_files(self.path, components)
        if missing:
            raise ModelFilesError(
                f"{what}: {self.path} is not a complete diffusers folder of this model; "
                f"missing {'; '.join(missing)}. docs/backbones.md lists the files it needs"
            )

    def load(self, cls, sub: str, dtype: torch.dtype | None = None, **kwargs):
        """`cls.from_pretrained(path, subfolder=sub, local_files_only=True)`, frozen."""
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        try:
            model = cls.from_pretrained(
                str(self.path), subfolder=sub, local_files_only=True, **kwargs
            )
        except (OSError, ValueError) as err:  # a corrupt config or weights file
            raise ModelFilesError(
                f"{self.what}: could not load {cls.__name__} from {self.path / sub}: {err}"
            ) from err
        if isinstance(model, nn.Module):
            model.requires_grad_(False).eval()
        return model
