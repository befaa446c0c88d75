"""open_clip from local files only: the image-text judge of the CLIP score and CLIP reward.

`load_open_clip(model, pretrained)` builds an open_clip model from a local weights file
(lit_grpo never downloads weights) and holds it frozen outside the module tree (`Frozen`);
`OpenCLIP.cosine(images, texts)` is the cosine similarity of their embeddings, with
open_clip's eval preprocessing applied to image tensors. open_clip itself is imported only
when a model is loaded (8 s).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lit_grpo.perception.frozen import Frozen


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


class OpenCLIP(Frozen):
    """A frozen open_clip model with its tokenizer and eval preprocessing (`load_open_clip`)."""

    size: tuple[int, int]
    mean: Tensor  # [3, 1, 1]
    std: Tensor

    def preprocess(self, images: Tensor) -> Tensor:
        """open_clip's eval transform on tensors [N, 3, H, W] in [0, 1]: shortest side to
        size (bicubic), centre crop, normalise."""
        # torchvision lazily: importing it costs a second to every `import lit_grpo.rewards`
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tvf

        images = tvf.resize(
            images.float(), min(self.size), InterpolationMode.BICUBIC, antialias=True
        ).clamp(0.0, 1.0)  # bicubic overshoots
        images = tvf.center_crop(images, list(self.size))
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    @torch.no_grad()
    def cosine(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """cos(E_image, E_text) [N] of images [N, 3, H, W] in [0, 1] and N texts, in [-1, 1],
        computed on the images' device."""
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts")
        net = self.on(images.device)
        image = net.encode_image(self.preprocess(images), normalize=True)  # [N, D]
        tokens = self.tokenize(list(texts)).to(images.device)
        text = net.encode_text(tokens, normalize=True)  # [N, D]
        return (image.float() * text.float()).sum(-1)


def load_open_clip(model: str, pretrained: str | os.PathLike) -> OpenCLIP:
    """An open_clip model, its tokenizer and image preprocessing, from local files only.

    `model` is an open_clip architecture name ("ViT-B-32") or the path of a model-config JSON
    in open_clip's format (embed_dim, vision_cfg, text_cfg); `pretrained` the weights file.
    Architectures whose text tower or tokenizer comes from Hugging Face need those files in the
    Hugging Face cache.
    """
    check_clip_files(model, pretrained)
    import open_clip  # 8 s to import: only when a CLIP model is asked for

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
    return OpenCLIP(
        net,
        tokenize=open_clip.get_tokenizer(name),
        size=tuple(size),
        mean=torch.tensor(cfg["mean"]).view(3, 1, 1),
        std=torch.tensor(cfg["std"]).view(3, 1, 1),
    )
