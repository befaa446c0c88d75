"""What the diffusers backbones share: local folders, text embedders, and the policy skeleton.

- `DiffusersFolder`: a local diffusers folder (the layout `save_pretrained` writes and the
  Hub snapshots hold: `model_index.json`, `transformer/`, `vae/`, `text_encoder*/`,
  `tokenizer*/`). Everything loads with `local_files_only=True`; `HF_HUB_OFFLINE=1` is set
  unless the user set it, so nothing reaches for the network. A missing folder or file is
  named in a one-line `ModelFilesError` (a `ConfigError`) before any weights are read.
- Text embedders: a callable `(instructions, images) -> TextEmbedding` (the `TextEmbedder`
  protocol). The real ones (`FluxTextEncoders`, `QwenVLTextEncoder`, in the backbones'
  files) load their encoders from the folder on first use; `WordEmbedder` is a tiny
  trainable-from-nothing one for tests and toy runs. Embedders live outside the policy's
  module tree: they are frozen, never in a checkpoint, never sharded, and stay on the CPU
  when `text_device="cpu"`. `EmbeddingCache` computes each embedding once.
- `DiffusersEditPolicy`: the `EditPolicy` parts both backbones share (VAE scale factor,
  shapes, 2x2 packing, LoRA defaults with float32 adapter weights, gradient checkpointing,
  attention capture, the blocks FSDP shards).

diffusers and transformers are imported inside the functions that use them.
"""

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from lit_grpo.checks import ConfigError
from lit_grpo.policies.attention_capture import AttentionRecorder, processors_swapped
from lit_grpo.policies.base import EditPolicy
from lit_grpo.policies.lora import LoraSettings, add_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class ModelFilesError(ConfigError):
    """A local model folder lacks a folder or file the policy needs (one line, named)."""


class DiffusersFolder:
    """A local diffusers folder; `needs` are the sub-folders the policy will load."""

    def __init__(self, path: str, needs: Sequence[str], what: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never the Hub
        self.path = Path(path).expanduser()
        self.what = what
        if not self.path.is_dir():
            raise ModelFilesError(
                f"{what}: pretrained folder not found: {self.path}. Point `pretrained` at a "
                "local diffusers folder (the Hub snapshot, e.g. from `huggingface-cli "
                "download` on a machine with network access)"
            )
        for sub in needs:
            self.require(sub)

    def require(self, sub: str) -> Path:
        folder = self.path / sub
        marker = "config.json" if not sub.startswith(("tokenizer", "processor")) else None
        missing = folder if not folder.is_dir() else None
        if missing is None and marker and not (folder / marker).is_file():
            missing = folder / marker
        if missing is not None:
            raise ModelFilesError(
                f"{self.what}: {missing} is missing; {self.path} is not a complete "
                f"diffusers folder of this model (it needs {sub}/)"
            )
        return folder

    def load(self, cls, sub: str, dtype: torch.dtype | None = None, **kwargs):
        """`cls.from_pretrained(path, subfolder=sub, local_files_only=True)`, frozen."""
        self.require(sub)
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        try:
            model = cls.from_pretrained(
                str(self.path), subfolder=sub, local_files_only=True, **kwargs
            )
        except (OSError, ValueError) as err:  # a missing weights file, a corrupt config
            raise ModelFilesError(
                f"{self.what}: could not load {cls.__name__} from {self.path / sub}: {err}"
            ) from err
        if isinstance(model, nn.Module):
            model.requires_grad_(False).eval()
        return model


@dataclass
class TextEmbedding:
    """text [N, L, D] token features, mask [N, L] (True on real tokens), pooled [N, P] or None."""

    text: Tensor
    mask: Tensor
    pooled: Tensor | None = None

    def to(self, device, dtype: torch.dtype | None = None) -> "TextEmbedding":
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return TextEmbedding(move(self.text), self.mask.to(device), move(self.pooled))


class TextEmbedder(Protocol):
    """Instructions (and, for a vision-language encoder, the source images [N, 3, H, W] in
    [0, 1]) -> their embedding. `uses_image` says whether the images matter."""

    uses_image: bool

    def __call__(self, instructions: Sequence[str], images: Tensor) -> TextEmbedding: ...


class WordEmbedder(nn.Module):
    """A tiny text embedder: ShapeWorld's word vocabulary, learned word and position vectors,
    and (with `pooled_dim`) a pooled vector. For tests and toy runs with tiny random
    backbones; the real backbones use their own encoders."""

    uses_image = False

    def __init__(self, dim: int, pooled_dim: int | None = None, max_words: int = 8, seed: int = 0):
        super().__init__()
        from lit_grpo.datamodules.shapeworld import VOCABULARY
        from lit_grpo.policies.text import WordTokenizer

        self.tokenizer = WordTokenizer(list(VOCABULARY), max_words)
        gen = torch.Generator().manual_seed(seed)
        self.words = nn.Parameter(torch.randn(len(self.tokenizer), dim, generator=gen))
        self.position = nn.Parameter(0.1 * torch.randn(max_words, dim, generator=gen))
        self.pool = None if pooled_dim is None else nn.Linear(dim, pooled_dim)
        self.requires_grad_(False)

    def forward(self, instructions: Sequence[str], images: Tensor) -> TextEmbedding:
        ids, mask = self.tokenizer(list(instructions), device=self.words.device)
        text = (self.words[ids] + self.position[: ids.shape[1]]) * mask[..., None]
        pooled = None
        if self.pool is not None:
            pooled = self.pool(text.sum(1) / mask.sum(1, keepdim=True))
        return TextEmbedding(text, mask, pooled)


class EmbeddingCache:
    """Each (instruction[, source image]) embedded once; the `size` most recent kept on the
    CPU. Instructions of a template dataset repeat, so the encoders rarely run. `trim` drops
    each row's trailing padding (for a backbone that masks padding, so that a row's
    embedding does not depend on the longest instruction it was batched with)."""

    def __init__(self, embedder: TextEmbedder, trim: bool = False, size: int = 4096):
        self.embedder, self.trim, self.size = embedder, trim, size
        self.entries: OrderedDict[str, TextEmbedding] = OrderedDict()

    def key(self, instruction: str, image: Tensor) -> str:
        if not getattr(self.embedder, "uses_image", False):
            return instruction
        digest = hashlib.sha1(image.detach().cpu().float().numpy().tobytes()).hexdigest()
        return f"{instruction}\0{digest}"

    def __call__(self, instructions: Sequence[str], images: Tensor) -> list[TextEmbedding]:
        """One embedding per row, on the CPU."""
        keys = [self.key(t, im) for t, im in zip(instructions, images)]
        missing = [k for k in dict.fromkeys(keys) if k not in self.entries]
        if missing:
            rows = [keys.index(k) for k in missing]
            out = self.embedder([instructions[r] for r in rows], images[rows])
            for j, k in enumerate(missing):
                length = out.mask.shape[1]
                if self.trim and out.mask[j].any():
                    length = int(out.mask[j].nonzero().max()) + 1
                pooled = None if out.pooled is None else out.pooled[j].detach().cpu()
                self.entries[k] = TextEmbedding(
                    out.text[j, :length].detach().cpu(), out.mask[j, :length].cpu(), pooled
                )
        for k in keys:
            self.entries.move_to_end(k)
        rows = [self.entries[k] for k in keys]
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return rows


def stack_embeddings(rows: list[TextEmbedding], pad_to: int | None = None) -> TextEmbedding:
    """Pad the rows' tokens to the longest (or `pad_to`) with zeros and mask False."""
    length = max(pad_to or 0, max(r.text.shape[0] for r in rows))
    text = torch.zeros(len(rows), length, rows[0].text.shape[-1], dtype=rows[0].text.dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        text[i, : r.text.shape[0]] = r.text
        mask[i, : r.mask.shape[0]] = r.mask
    pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
    return TextEmbedding(text, mask, pooled)


def pack(latents: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, h/2 * w/2, 4C]: 2x2 patches as tokens (diffusers' `_pack_latents`)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """[N, h/2 * w/2, 4C] -> [N, C, h, w]: the inverse of `pack`."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


class DiffusersEditPolicy(EditPolicy):
    """The shared skeleton of the diffusers backbones (see the module docstring).

    Subclasses set `lora_targets`, `vae_scale_factor`, `_encode_latents`,
    `_decode_latents`, `encode_condition`, `velocity` and `capture_processor`.
    """

    lora_targets: list[str] = []

    def _setup(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text: TextEmbedder,
        text_device: str = "model",
        gradient_checkpointing: bool = False,
        config: dict | None = None,
        trim_text: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        if text_device not in ("model", "cpu"):
            raise ValueError(f"text_device must be 'model' or 'cpu', got {text_device!r}")
        self.transformer = transformer
        self.vae = vae.requires_grad_(False).eval()
        # outside the module tree: not moved with the policy, not in its state dict
        self.__dict__["text"] = EmbeddingCache(text, trim=trim_text)
        self.text_device = text_device
        self.config = dict(config or {})
        self.recorder = AttentionRecorder()
        self._capturing: list[Tensor] | None = None
        self.built_from_folder = False  # the constructors set it: `pretrained` alone, no `weights`
        self.checkpoint_activations(gradient_checkpointing)

    @property
    def frozen_from_source(self) -> bool:
        """True when the policy was built from its `pretrained` folder alone (no `weights`
        file merged over it) and carries a LoRA adapter: the frozen transformer and VAE are
        then the folder's, and checkpoints hold the adapter only (docs/backbones.md)."""
        return self.built_from_folder and self.has_lora

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def shard_modules(self) -> list[nn.Module]:
        """The transformer blocks, each its own FSDP unit."""
        raise NotImplementedError

    def checkpoint_activations(self, enabled: bool = True) -> None:
        """Activation checkpointing through diffusers' own (`enable_gradient_checkpointing`:
        the transformer recomputes each block in the backward pass, and only when grad is
        enabled, so the rollouts run as they are). The one mechanism of these policies, in
        place of `EditPolicy`'s block wrapper: the `gradient_checkpointing` argument and
        `ShardingSettings.activation_checkpointing` both come here."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    @property
    def checkpointing_activations(self) -> bool:
        return bool(getattr(self.transformer, "gradient_checkpointing", False))

    # --- LoRA: the backbone's default targets, adapter weights in float32 -------------------
    def add_lora(self, settings: LoraSettings) -> None:
        """LoRA on `lora_targets` (or `settings.target_modules`); the adapter weights are kept
        in float32 even on a bf16 transformer (peft casts the activations to them), so that
        small updates are not rounded away."""
        self.requires_grad_(False)
        add_lora(self.transformer, settings, default_targets=self.lora_targets)
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()

    def prepare_training(self, lora: LoraSettings | None, full: str = "denoiser") -> None:
        """As `EditPolicy.prepare_training`, except that the VAE and the text encoders are
        always frozen (Talk2Move freezes them): without LoRA only the transformer trains,
        whatever `full` says."""
        if full not in ("denoiser", "all"):
            raise ValueError(f"full must be 'denoiser' or 'all', got {full!r}")
        super().prepare_training(lora, full="denoiser")

    # --- images and shapes -------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        raise NotImplementedError

    def _check_size(self, size: tuple[int, int]) -> None:
        step = 2 * self.vae_scale_factor
        if size[0] % step or size[1] % step:
            raise ValueError(
                f"{type(self).__name__} takes images whose sides are multiples of {step} "
                f"(VAE factor {self.vae_scale_factor} x 2x2 packing); got {tuple(size)}"
            )

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        self._check_size(image_size)
        f = self.vae_scale_factor
        return self.latent_channels, image_size[0] // f, image_size[1] // f

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        _, h, w = self.latent_shape(image_size)
        return h // 2, w // 2

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] -> float32 latents [N, C, h, w] (the VAE's mode,
        scaled and shifted as the pipeline does)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        self._check_size(tuple(images.shape[-2:]))
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            return self._encode_latents((images * 2 - 1).to(vae_dtype)).float()

    def decode(self, latents: Tensor) -> Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        images = self._decode_latents(latents.to(vae_dtype))
        return ((images.float() + 1) / 2).clamp(0, 1)

    def embed_text(self, instructions: Sequence[str], images: Tensor) -> TextEmbedding:
        """The instructions' embedding [N, L, D] on the images' device, in the transformer's
        dtype; computed once per instruction (and source image, for a vision-language
        encoder) on `text_device`."""
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        embedder = self.text.embedder
        if isinstance(embedder, nn.Module):
            device = torch.device("cpu") if self.text_device == "cpu" else images.device
            embedder.to(device)
        else:
            device = "cpu" if self.text_device == "cpu" else images.device
            if hasattr(embedder, "device"):
                embedder.device = device
        with torch.no_grad():
            rows = self.text(list(instructions), images.to(device))
        return stack_embeddings(rows).to(images.device, self.latent_dtype)

    # --- attention capture ---------------------------------------------------------------------
    def capture_processor(self):
        raise NotImplementedError

    @contextmanager
    def capture_attention(self, enabled: bool = True) -> Iterator[list[Tensor]]:
        """Per velocity call (the conditional pass): the instruction tokens' attention over
        the target-image tokens [N, L, rows, cols] (softmax over every key, target columns
        kept; heads and layers averaged; padding rows 0)."""
        if not enabled:
            yield []
            return
        maps: list[Tensor] = []
        processor = self.capture_processor()
        with processors_swapped(self.transformer, lambda _: processor):
            self._capturing = maps
            try:
                yield maps
            finally:
                self._capturing = None
                self.recorder.active = False
