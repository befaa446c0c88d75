"""CLIP score of the edit against a text of the batch, through open_clip with local weights.

Score per edit: 100 * max(cos(E_image, E_text), 0) (Hessel et al.'s CLIPScore, torchmetrics'
formula; torchmetrics clamps the batch mean, we clamp each edit as the paper does). The text is
batch["instruction"] by default (InstructRL4Pix's CLIP reward pairs the edit with its
instruction); ShapeWorld has no caption of the edited scene, and a dataset that has one can
name its field in `text`. CLIP reads little geometry: on spatial edits this measures that the
scene still shows what the text names, not that the object moved.

Why not torchmetrics' `CLIPScore`: since 1.7 it takes a callable returning (model, processor),
but that pair must speak transformers' interface (a processor taking lists of CPU images and
returning "pixel_values", a model with `get_image_features`, `get_text_features` and
`.config`), so open_clip needs two adapter classes; and its model sits in the metric's
`state_dict`, so a LightningModule owning it would checkpoint the CLIP weights. This class
uses open_clip directly and keeps the model outside the state (see `base.Frozen`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from lit_grpo.metrics.base import EditMetric, Frozen


def check_clip_files(model: str, pretrained: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the weights file (or model config) that is missing."""
    file = Path(pretrained).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"CLIP weights not found: {file}. `pretrained` must be a local weights file for "
            f"{model!r} (e.g. open_clip_pytorch_model.bin from the model's Hugging Face page); "
            "lit_grpo never downloads weights, so open_clip tags such as 'openai' are refused."
        )
    if model.endswith(".json") and not Path(model).expanduser().is_file():
        raise FileNotFoundError(f"open_clip model config not found: {Path(model).expanduser()}")


def load_open_clip(model: str, pretrained: str | os.PathLike) -> Frozen:
    """An open_clip model, its tokenizer and image preprocessing, from local files only.

    `model` is an open_clip architecture name ("ViT-B-32") or the path of a model-config JSON
    in open_clip's format (embed_dim, vision_cfg, text_cfg); `pretrained` the weights file.
    Architectures whose text tower or tokenizer comes from Hugging Face need those files in the
    Hugging Face cache.
    """
    check_clip_files(model, pretrained)
    import open_clip  # 8 s to import: only when a CLIP score is asked for

    name = model
    if model.endswith(".json"):
        config = Path(model).expanduser()
        open_clip.add_model_config(config)  # registered under the file's stem
        name = config.stem
    elif model not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {model!r}: pass a name from "
            "open_clip.list_models() or the path of a model-config .json"
        )
    net = open_clip.create_model(name, pretrained=str(Path(pretrained).expanduser()))
    cfg = open_clip.get_model_preprocess_cfg(net)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    return Frozen(
        net,
        tokenize=open_clip.get_tokenizer(name),
        size=tuple(size),
        mean=torch.tensor(cfg["mean"]).view(3, 1, 1),
        std=torch.tensor(cfg["std"]).view(3, 1, 1),
    )


class CLIPScore(EditMetric):
    """Mean CLIP score (0-100, higher is better) of the edits against `batch[text]`.

    Args:
        model: open_clip architecture name, or path of a model-config JSON.
        pretrained: local weights file (required: nothing is downloaded).
        text: the batch field holding one text per edit.
        task: score only this task's edits (None: all).
    """

    higher_is_better = True

    def __init__(
        self,
        model: str,
        pretrained: str,
        text: str = "instruction",
        task: str | None = None,
    ) -> None:
        super().__init__(task)
        self.text = text
        self.judge = load_open_clip(model, pretrained)

    def values(self, source: Tensor, edited: Tensor, batch: Mapping, before, after) -> Tensor:
        clip = self.judge
        net = clip.on(edited.device)
        image = net.encode_image(self._preprocess(edited.float()), normalize=True)  # [N, D]
        tokens = clip.tokenize(list(batch[self.text])).to(edited.device)
        text = net.encode_text(tokens, normalize=True)  # [N, D]
        return 100.0 * (image * text).sum(-1).clamp_min(0.0)

    def _preprocess(self, images: Tensor) -> Tensor:
        """open_clip's eval transform on tensors: shortest side to size (bicubic), centre crop,
        normalise."""
        clip = self.judge
        images = tvf.resize(
            images, min(clip.size), InterpolationMode.BICUBIC, antialias=True
        ).clamp(0.0, 1.0)  # bicubic overshoots
        images = tvf.center_crop(images, list(clip.size))
        return (images - clip.mean.to(images.device)) / clip.std.to(images.device)
