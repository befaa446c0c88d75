"""The embedded editing policy: a small flow-matching transformer in the image of FLUX.1-Kontext.

One joint-attention stream holds [instruction tokens | source-image tokens | noisy target
tokens], with 2-D rotary positions shared by the source and target grids (Kontext tells
the two apart with an extra position axis; we add a learned type embedding instead) and the
noise level entering through adaLN-Zero modulation, as in DiT/Flux.

Where it departs from the real backbones, on purpose:
- no VAE: it works in pixel space (latent = 2 * image - 1, 3 channels); patches of
  `patch_size` pixels are its tokens. ShapeWorld images are small enough for that, and a
  VAE would dominate CPU time.
- a word-level text encoder trained with the model (`lit_grpo.policies.text`).
Rotary positions make it resolution-free: the same weights run at any image size that is a
multiple of `patch_size`.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_grpo.policies.base import Condition, EditPolicy
from lit_grpo.policies.text import TextEncoder, WordTokenizer
from lit_grpo.policies.weights import load_policy_weights


def _rope_1d(pos: Tensor, dim: int, theta: float = 100.0) -> tuple[Tensor, Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    angles = pos.float()[:, None] * freqs[None]  # [T, dim / 2]
    return angles.cos(), angles.sin()


def rope_2d(rows: Tensor, cols: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim / 2]: half of each head rotates with the row, half with the column."""
    cr, sr = _rope_1d(rows, head_dim // 2)
    cc, sc = _rope_1d(cols, head_dim // 2)
    return torch.cat([cr, cc], -1), torch.cat([sr, sc], -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [N, heads, T, head_dim / 2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)
        self.norm_q = nn.RMSNorm(width // heads)
        self.norm_k = nn.RMSNorm(width // heads)

    def queries_keys_values(self, x: Tensor, rope: tuple[Tensor, Tensor]):
        """q, k, v [N, heads, T, head_dim]: q and k normed and rotated."""
        n, t, w = x.shape
        split = lambda y: y.view(n, t, self.heads, w // self.heads).transpose(1, 2)  # noqa: E731
        q = apply_rope(self.norm_q(split(self.to_q(x))), *rope)
        k = apply_rope(self.norm_k(split(self.to_k(x))), *rope)
        return q, k, split(self.to_v(x))

    def probabilities(
        self, x: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor, queries: slice
    ) -> Tensor:
        """[N, heads, Q, T]: the attention of the `queries` tokens over every token, as
        `forward` applies it (for reading where tokens look, e.g. `benchmarks/copy_shift.py`)."""
        q, k, _ = self.queries_keys_values(x, rope)
        return attention_probabilities(q[:, :, queries], k, key_mask)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor, capture=None
    ) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.queries_keys_values(x, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        if capture is not None:  # (list, text tokens L, target tokens T): text -> target map
            maps, n_text, n_target = capture
            probs = attention_probabilities(q[:, :, :n_text], k, key_mask)[..., -n_target:]
            maps.append(probs.mean(1))  # [N, L, T], averaged over heads
        return self.to_out(out.transpose(1, 2).reshape(n, t, w))


def attention_probabilities(q: Tensor, k: Tensor, key_mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) [N, heads, Q, T] over the keys that `key_mask` [N, T] keeps:
    what scaled_dot_product_attention weighs the values by."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the noise level."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.ff_in = nn.Linear(width, mlp_ratio * width)
        self.ff_out = nn.Linear(mlp_ratio * width, width)
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, c: Tensor, rope, key_mask: Tensor, capture=None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(
            6, -1
        )
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, rope, key_mask, capture)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.ff_out(F.gelu(self.ff_in(h), approximate="tanh"))


def timestep_embedding(sigma: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device) / half)
    args = 1000.0 * sigma.float()[:, None] * freqs[None]  # sigma in [0, 1] -> "timestep" 0..1000
    return torch.cat([args.cos(), args.sin()], -1)


class TinyEditTransformer(nn.Module):
    """The denoiser: the part LoRA adapts."""

    lora_targets = ["to_q", "to_k", "to_v", "to_out", "ff_in", "ff_out"]

    def __init__(self, channels: int, patch_size: int, width: int, depth: int, heads: int):
        super().__init__()
        if width % heads or (width // heads) % 4:
            raise ValueError(f"width {width} must split into {heads} heads of a multiple of 4")
        self.patch_size = patch_size
        self.channels = channels
        patch_dim = channels * patch_size**2
        self.target_in = nn.Linear(patch_dim, width)
        self.source_in = nn.Linear(patch_dim, width)
        self.text_in = nn.Linear(width, width)
        self.type_embed = nn.Parameter(torch.zeros(3, width))  # text, source, target
        nn.init.normal_(self.type_embed, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.pooled_text = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation_out = nn.Linear(width, 2 * width)
        self.proj_out = nn.Linear(width, patch_dim)
        for layer in (self.modulation_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.width, self.heads = width, heads
        self.attention_maps: list[Tensor] | None = None  # set by TinyEditPolicy.capture_attention

    def patchify(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: Tensor, h: int, w: int) -> Tensor:
        n, p, c = tokens.shape[0], self.patch_size, self.channels
        x = tokens.view(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, h, w)

    def forward(
        self, x: Tensor, sigma: Tensor, text: Tensor, text_mask: Tensor, image: Tensor
    ) -> Tensor:
        n, _, h, w = x.shape
        rows, cols = h // self.patch_size, w // self.patch_size
        target = self.target_in(self.patchify(x)) + self.type_embed[2]
        source = self.source_in(self.patchify(image)) + self.type_embed[1]
        words = self.text_in(text) + self.type_embed[0]
        tokens = torch.cat([words, source, target], 1)  # [N, L + 2 * rows * cols, width]

        grid = torch.arange(rows * cols, device=x.device)
        r, c = grid // cols, grid % cols
        zeros = torch.zeros(text.shape[1], dtype=torch.long, device=x.device)
        rope = rope_2d(torch.cat([zeros, r, r]), torch.cat([zeros, c, c]), self.width // self.heads)
        rope = tuple(t.to(tokens.dtype) for t in rope)  # bf16 models stay in bf16
        key_mask = torch.cat([text_mask, text_mask.new_ones(n, 2 * rows * cols)], 1)

        pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        t_emb = timestep_embedding(sigma, self.width).to(tokens.dtype)
        cond = self.time_mlp(t_emb) + self.pooled_text(pooled)
        layers = [] if self.attention_maps is not None else None
        capture = None if layers is None else (layers, text.shape[1], rows * cols)
        for block in self.blocks:
            tokens = block(tokens, cond, rope, key_mask, capture)
        if layers is not None:  # [N, L, rows, cols], averaged over the layers
            maps = torch.stack(layers).mean(0) * text_mask[..., None]
            self.attention_maps.append(maps.view(n, -1, rows, cols))
        shift, scale = self.modulation_out(F.silu(cond))[:, None].chunk(2, -1)
        out = self.proj_out(self.norm_out(tokens[:, -rows * cols :]) * (1 + scale) + shift)
        return self.unpatchify(out, h, w)


class TinyEditPolicy(EditPolicy):
    """The embedded ShapeWorld editor (about 1.3M parameters at the defaults).

    Args:
        patch_size: pixels per token side; image sides must be multiples of it.
        width, depth, heads: transformer size.
        text_layers: layers of the word-level text encoder.
        max_words: instruction length in words (longer ones are cut).
        vocabulary: instruction words; ShapeWorld's template vocabulary by default.
        weights: a `.safetensors` file written by lit_grpo, a Lightning `.ckpt` of a
            lit_grpo stage, or a built-in name (`shapeworld-sft`); None for random init.
        activation_checkpointing: recompute the transformer blocks' activations in the
            backward pass instead of keeping them (`EditPolicy.checkpoint_activations`).
    """

    # ours: attention over (side / 4)^2 tokens makes its cost grow with the 4th power of the
    # side; at 512 px one ODE step takes about a minute on two CPU cores
    max_edit_side = 512

    def __init__(
        self,
        patch_size: int = 4,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        text_layers: int = 1,
        max_words: int = 16,
        vocabulary: list[str] | None = None,
        weights: str | None = None,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if vocabulary is None:
            from lit_grpo.datamodules.shapeworld import VOCABULARY

            vocabulary = list(VOCABULARY)
        self.config = dict(
            patch_size=patch_size,
            width=width,
            depth=depth,
            heads=heads,
            text_layers=text_layers,
            max_words=max_words,
            vocabulary=list(vocabulary),
        )
        self.tokenizer = WordTokenizer(vocabulary, max_words)
        self.text_encoder = TextEncoder(len(self.tokenizer), width, text_layers, heads, max_words)
        self.transformer = TinyEditTransformer(3, patch_size, width, depth, heads)
        if weights is not None:
            load_policy_weights(self, weights)
        self.checkpoint_activations(activation_checkpointing)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def shard_modules(self) -> list[nn.Module]:
        """The transformer blocks, one FSDP unit each (the text encoder stays whole)."""
        return list(self.transformer.blocks)

    def encode_images(self, images: Tensor) -> Tensor:
        self._check_size(images)
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def encode_condition(
        self, images: Tensor, instructions: Sequence[str], keys: Sequence[str] | None = None
    ) -> Condition:
        """`keys` are not needed: nothing here is computed from an image worth caching."""
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        ids, mask = self.tokenizer(instructions, device=images.device)
        return Condition(
            text=self.text_encoder(ids, mask), text_mask=mask, image=self.encode_images(images)
        )

    def velocity(self, latents: Tensor, sigma: Tensor, condition: Condition) -> Tensor:
        return self.transformer(
            latents, sigma, condition.text, condition.text_mask, condition.image
        )

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        p = self.transformer.patch_size
        return image_size[0] // p, image_size[1] // p

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        return (3, *image_size)  # pixel space: the latent is the image, rescaled to [-1, 1]

    @contextmanager
    def capture_attention(self, enabled: bool = True) -> Iterator[list[Tensor]]:
        """Per velocity call: the instruction tokens' attention over the target-image tokens
        [N, L, rows, cols] (softmax over every key, target columns kept; heads and layers
        averaged; padding rows 0)."""
        if not enabled:
            yield []
            return
        maps: list[Tensor] = []
        self.transformer.attention_maps = maps
        try:
            yield maps
        finally:
            self.transformer.attention_maps = None

    def phrase_tokens(self, instructions: Sequence[str], phrases: Sequence[str]) -> Tensor:
        """The word positions of each phrase in its instruction [N, max_words] (the word-level
        tokenizer's: one token per word)."""
        return self.tokenizer.phrase_mask(instructions, phrases)

    def _check_size(self, images: Tensor) -> None:
        p = self.transformer.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(
                f"TinyEditPolicy takes images [N, 3, H, W] with H and W multiples of the patch "
                f"size {p}; got {tuple(images.shape)}"
            )
