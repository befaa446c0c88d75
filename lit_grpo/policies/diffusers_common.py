"""What the diffusers backbones share: text embedders, their cache, and the policy skeleton.

- Text embedders: a callable `(instructions, images) -> TextEmbedding` (the `TextEmbedder`
  protocol). The real ones (`FluxTextEncoders`, `QwenVLTextEncoder`, in the backbones'
  files) load their encoders from the folder on first use; `WordEmbedder` is a tiny
  trainable-from-nothing one for tests and toy runs. Embedders live outside the policy's
  module tree: they are frozen, never in a checkpoint, never sharded, and stay on the CPU
  when `text_device="cpu"`.
- `EmbeddingCache` computes each embedding once and keeps it on the CPU: by instruction, and
  for an embedder that reads the source image (`uses_image`: Qwen2.5-VL) by instruction and
  the key the caller names the image by (a batch's `source_path`), never by its pixels
  (ours: hashing them read every source back to the host on every step). A row whose image
  has no key is embedded on every call and not kept. A batch's rows are stacked in pinned
  memory (for a CUDA device) and copied with `non_blocking=True`: a cached embedding costs
  no host sync.
- `DiffusersEditPolicy`: the `EditPolicy` parts both backbones share (VAE scale factor,
  shapes, 2x2 packing, LoRA defaults with float32 adapter weights, gradient checkpointing,
  attention capture, the blocks FSDP shards) and the pipelines' preferred resolutions: with
  `auto_resize` every input is resized to the size the pipeline would edit it at
  (`edit_size`) and `decode_to` maps the edits back to the source's size, where rewards,
  metrics and masks live.
- Local folders and the files they must hold: `lit_grpo.policies.diffusers_folder`.

diffusers and transformers are imported inside the functions that use them.
"""

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lit_grpo.policies.attention_capture import AttentionRecorder, processors_swapped
from lit_grpo.policies.base import EditPolicy, resize_images
from lit_grpo.policies.lora import LoraSettings, add_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class TextEmbedding:
    """text [N, L, D] token features, mask [N, L] (True on real tokens), pooled [N, P] or None."""

    text: Tensor
    mask: Tensor
    pooled: Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "TextEmbedding":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TextEmbedding(move(self.text), move(self.mask), move(self.pooled))


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
    """Each (instruction[, named source image]) embedded once; the `size` most recent kept on
    the CPU. Instructions of a template dataset repeat, so the encoders rarely run. An
    embedder that reads the image is cached by the image's key (`keys`), never its pixels;
    rows without a key are embedded every call. `trim` drops each row's trailing padding
    (for a backbone that masks padding, so that a row's embedding does not depend on the
    longest instruction it was batched with)."""

    def __init__(self, embedder: TextEmbedder, trim: bool = False, size: int = 4096):
        self.embedder, self.trim, self.size = embedder, trim, size
        self.entries: OrderedDict[str, TextEmbedding] = OrderedDict()

    def key(self, instruction: str, image_key: str | None, size: tuple[int, int]) -> str | None:
        """The cache key of a row; None for a row the cache cannot name (an image-reading
        embedder and no image key)."""
        if not getattr(self.embedder, "uses_image", False):
            return instruction
        if image_key is None:
            return None
        return f"{instruction}\0{image_key}\0{size[0]}x{size[1]}"

    def __call__(
        self,
        instructions: Sequence[str],
        images: Tensor,
        keys: Sequence[str] | None = None,
        device: torch.device | None = None,
    ) -> list[TextEmbedding]:
        """One embedding per row, on the CPU. The images [N, 3, H, W] are moved to the
        embedder's `device` and read only for the rows embedded now, and only by an
        embedder that reads them."""
        n = len(instructions)
        if keys is not None and len(keys) != n:
            raise ValueError(f"{len(keys)} image keys for {n} instructions")
        size = (images.shape[-2], images.shape[-1])
        image_keys = [None] * n if keys is None else list(keys)
        names = [self.key(t, k, size) for t, k in zip(instructions, image_keys)]
        todo: dict = {}  # a missing key (or, for an unnamed row, its index) -> its first row
        for i, name in enumerate(names):
            if name is None:
                todo[i] = i
            elif name not in self.entries and name not in todo:
                todo[name] = i
        fresh = {}
        if todo:
            rows = list(todo.values())
            picked = images if rows == list(range(n)) else images[rows]
            if device is not None and getattr(self.embedder, "uses_image", False):
                picked = picked.to(device)  # (an embedder that ignores them: left where they are)
            out = self.embedder([instructions[r] for r in rows], picked)
            fresh = dict(zip(todo, self._rows(out)))
        for name, emb in fresh.items():
            if isinstance(name, str):
                self.entries[name] = emb
        found = [fresh[i] if name is None else self.entries[name] for i, name in enumerate(names)]
        for name in names:
            if name is not None:
                self.entries.move_to_end(name)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return found

    def _rows(self, out: TextEmbedding) -> list[TextEmbedding]:
        """The embedder's batch as CPU rows (one device-to-host copy per tensor), each
        trimmed of its trailing padding with `trim`."""
        text, mask = out.text.detach().cpu(), out.mask.cpu()
        pooled = None if out.pooled is None else out.pooled.detach().cpu()
        rows = []
        for j in range(text.shape[0]):
            length = mask.shape[1]
            if self.trim and mask[j].any():
                length = int(mask[j].nonzero().max()) + 1
            p = None if pooled is None else pooled[j].clone()
            rows.append(TextEmbedding(text[j, :length].clone(), mask[j, :length].clone(), p))
        return rows


def stack_embeddings(
    rows: list[TextEmbedding],
    pad_to: int | None = None,
    dtype: torch.dtype | None = None,
    pin: bool = False,
) -> TextEmbedding:
    """Pad the rows' tokens to the longest (or `pad_to`) with zeros and mask False, in
    `dtype` (the rows' by default); `pin`: in pinned (page-locked) memory, so that the copy
    to a GPU can run without blocking the host."""
    length = max(pad_to or 0, max(r.text.shape[0] for r in rows))
    dtype = dtype or rows[0].text.dtype
    n, dim = len(rows), rows[0].text.shape[-1]
    text = torch.zeros(n, length, dim, dtype=dtype, pin_memory=pin)
    mask = torch.zeros(n, length, dtype=torch.bool, pin_memory=pin)
    for i, r in enumerate(rows):
        text[i, : r.text.shape[0]] = r.text
        mask[i, : r.mask.shape[0]] = r.mask
    pooled = None
    if rows[0].pooled is not None:
        pooled = torch.empty(n, rows[0].pooled.shape[-1], dtype=dtype, pin_memory=pin)
        pooled.copy_(torch.stack([r.pooled for r in rows]))
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

    Subclasses set `lora_targets`, `vae_scale_factor`, `preferred_size`,
    `_encode_latents`, `_decode_latents`, `encode_condition`, `velocity` and
    `capture_processor`.
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
        auto_resize: bool = False,
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
        self.auto_resize = auto_resize
        # the constructors set these: built from `pretrained` (and the `weights` file merged
        # over it, named in `base_weights`), so that both can be read again
        self.built_from_folder = False
        self.base_weights: str | None = None
        self.checkpoint_activations(gradient_checkpointing)

    @property
    def frozen_from_source(self) -> bool:
        """True when the policy was built from local files alone (its `pretrained` folder,
        and the `weights` file merged over it if any: `base_weights`) and carries a LoRA
        adapter: the constructor rebuilds every frozen weight from them, and checkpoints hold
        the adapter only (docs/backbones.md)."""
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

    def preferred_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) the backbone's diffusers pipeline edits an image of `image_size` at."""
        raise NotImplementedError

    def edit_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """`preferred_size` with `auto_resize`, else the image's own size (whose sides must
        then be multiples of the token size)."""
        if self.auto_resize:
            return self.preferred_size((int(image_size[0]), int(image_size[1])))
        return int(image_size[0]), int(image_size[1])

    def to_edit_size(self, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] resized to `edit_size` (as they are when it is theirs)."""
        return resize_images(images, self.edit_size(tuple(images.shape[-2:])))

    def _check_size(self, size: tuple[int, int]) -> None:
        step = 2 * self.vae_scale_factor
        if size[0] % step or size[1] % step:
            raise ValueError(
                f"{type(self).__name__} takes images whose sides are multiples of {step} "
                f"(VAE factor {self.vae_scale_factor} x 2x2 packing) unless auto_resize is "
                f"on; got {tuple(size)}"
            )

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        h, w = self.edit_size(image_size)
        self._check_size((h, w))
        f = self.vae_scale_factor
        return self.latent_channels, h // f, w // f

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        _, h, w = self.latent_shape(image_size)
        return h // 2, w // 2

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] -> float32 latents [N, C, h, w] of the images at
        `edit_size` (the VAE's mode, scaled and shifted as the pipeline does)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        return self._latents(self.to_edit_size(images))

    def _latents(self, images: Tensor) -> Tensor:
        """`encode_images` of images already at their edit size."""
        self._check_size(tuple(images.shape[-2:]))
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            return self._encode_latents((images * 2 - 1).to(vae_dtype)).float()

    def decode(self, latents: Tensor) -> Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        images = self._decode_latents(latents.to(vae_dtype))
        return ((images.float() + 1) / 2).clamp(0, 1)

    def embed_text(
        self, instructions: Sequence[str], images: Tensor, keys: Sequence[str] | None = None
    ) -> TextEmbedding:
        """The instructions' embedding [N, L, D] on the images' device, in the transformer's
        dtype: computed once per instruction (and named source image, for a vision-language
        encoder: `keys`) on `text_device`, kept on the CPU, stacked in pinned memory for a
        CUDA device and copied without blocking."""
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        embedder, device = self.text.embedder, images.device
        text_device = torch.device("cpu") if self.text_device == "cpu" else device
        if isinstance(embedder, nn.Module):
            embedder.to(text_device)
        elif hasattr(embedder, "device"):
            embedder.device = text_device
        with torch.no_grad():
            rows = self.text(list(instructions), images, keys, text_device)
        pinned = stack_embeddings(rows, dtype=self.latent_dtype, pin=device.type == "cuda")
        return pinned.to(device, non_blocking=True)

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
