"""FLUX.1-Kontext behind the `EditPolicy` contract (diffusers `FluxTransformer2DModel`).

What the policy does, as diffusers' `FluxKontextPipeline` does it:
- latents: `AutoencoderKL`, `(z - shift_factor) * scaling_factor` (the posterior's mode),
  packed into 2x2 patches: a token per 2x2 latent cells (`token_grid` = latent / 2);
- the condition image: the source's latents, packed, concatenated after the target tokens
  on the sequence axis, with position ids `(1, row, col)` against the target's `(0, row,
  col)`; the output is sliced back to the target tokens;
- text: T5 token features (`max_sequence_length` tokens, padding included and attended,
  as the pipeline does; `Condition.text_mask` marks the real tokens, for the attention
  maps only) and CLIP's pooled vector;
- noise level: the transformer takes `timestep = sigma` (the pipeline passes t / 1000 with
  t = 1000 sigma; the model scales by 1000 inside) and predicts `noise - x0`, lit_grpo's
  flow convention (the scheduler's Euler step is `x + (sigma_next - sigma) v`);
- guidance: Kontext is guidance-distilled; `guidance` enters through the guidance
  embedding (no second pass), in sampling and in the training forward alike.

- size: with `auto_resize` (the default) the source is resized to the preferred Kontext
  resolution nearest its aspect ratio (the pipeline's `PREFERRED_KONTEXT_RESOLUTIONS`, read
  from the installed diffusers; all about 1 MP) and the edit is made at that size; the
  decoded edits are resized back to the source's size (`decode_to`).

Where we depart from the pipeline, on purpose: the VAE's mode is used for the SFT targets
as well as for the condition, and images are resized as tensors (bicubic, antialiased)
where the pipeline resizes PIL images with Lanczos.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_grpo.policies.attention_capture import FluxCaptureProcessor
from lit_grpo.policies.base import Condition
from lit_grpo.policies.diffusers_common import (
    DiffusersEditPolicy,
    TextEmbedder,
    TextEmbedding,
    pack,
    torch_dtype,
    unpack,
)
from lit_grpo.policies.diffusers_folder import (
    Component,
    DiffusersFolder,
    diffusers_model,
    transformers_model,
)
from lit_grpo.policies.weights import load_policy_weights, weights_reference

# what FluxKontextPolicy loads from its folder (docs/backbones.md lists the files)
FLUX_KONTEXT_FILES = (
    diffusers_model("transformer", "FluxTransformer2DModel"),
    diffusers_model("vae", "AutoencoderKL"),
    transformers_model("text_encoder", "CLIP's text model"),
    Component("tokenizer", "CLIP's tokenizer", files=((("vocab.json", "merges.txt"),),)),
    transformers_model("text_encoder_2", "T5's encoder"),
    Component("tokenizer_2", "T5's tokenizer", files=((("tokenizer.json",), ("spiece.model",)),)),
)


@dataclass
class FluxCondition(Condition):
    """`Condition` plus CLIP's pooled instruction vector pooled [N, P]."""

    pooled: Tensor | None = None


class FluxTextEncoders:
    """Kontext's text encoders from the folder, loaded on first use: CLIP (`text_encoder`,
    `tokenizer`: the pooled vector) and T5 (`text_encoder_2`, `tokenizer_2`: the tokens)."""

    uses_image = False

    def __init__(self, folder: DiffusersFolder, dtype: torch.dtype, max_sequence_length: int):
        self.folder, self.dtype, self.max_sequence_length = folder, dtype, max_sequence_length
        self.device = "cpu"
        self.models = None

    def _load(self):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        f = self.folder
        self.models = (
            f.load(CLIPTokenizer, "tokenizer"),
            f.load(CLIPTextModel, "text_encoder", self.dtype),
            f.load(T5TokenizerFast, "tokenizer_2"),
            f.load(T5EncoderModel, "text_encoder_2", self.dtype),
        )

    def __call__(self, instructions: Sequence[str], images: Tensor) -> TextEmbedding:
        if self.models is None:
            self._load()
        clip_tok, clip, t5_tok, t5 = self.models
        clip.to(self.device)
        t5.to(self.device)

        def tokens(tokenizer, length: int):
            return tokenizer(
                list(instructions),
                padding="max_length",
                max_length=length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)

        pooled = clip(tokens(clip_tok, clip_tok.model_max_length).input_ids).pooler_output
        t5_inputs = tokens(t5_tok, self.max_sequence_length)
        text = t5(t5_inputs.input_ids)[0]
        # the transformer attends every token, padding included (as the pipeline does); the
        # mask marks the real ones for the attention maps
        mask = t5_inputs.attention_mask.bool()
        return TextEmbedding(text, mask, pooled)


class FluxKontextPolicy(DiffusersEditPolicy):
    """FLUX.1-Kontext [dev] from a local diffusers folder (see the module docstring).

    Args:
        pretrained: the local diffusers folder (`model_index.json`, `transformer/`, `vae/`,
            `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/`).
        dtype: weights of the transformer, VAE and text encoders ("bfloat16", "float16",
            "float32"); LoRA weights stay float32.
        guidance: the distilled guidance scale (the pipeline's `guidance_scale`; 2.5 in
            Kontext's examples).
        text_device: where the frozen text encoders run: "model" (the policy's device) or
            "cpu" (saves ~10 GB of GPU memory; each instruction is encoded once anyway).
        max_sequence_length: T5 tokens (512 in the pipeline; shorter is faster).
        gradient_checkpointing: recompute each transformer block in the backward pass.
        weights: a lit_grpo weights file or checkpoint of this policy, loaded over the
            folder's (checkpoints then keep the LoRA adapter and name this file, which must
            stay readable: docs/backbones.md).
        auto_resize: edit every source at the preferred Kontext resolution nearest its
            aspect ratio, as the pipeline does, and resize the edits back to the source's
            size; False: at the source's own size (sides multiples of 16).
    """

    lora_targets = [
        "to_q", "to_k", "to_v", "to_out.0",  # attention projections, both streams
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "norm1.linear", "norm1_context.linear", "norm.linear",  # adaLN modulation
        "proj_mlp", "proj_out",  # single-stream blocks (and the output layer)
    ]  # fmt: skip

    def __init__(
        self,
        pretrained: str,
        dtype: str = "bfloat16",
        guidance: float = 2.5,
        text_device: str = "model",
        max_sequence_length: int = 512,
        gradient_checkpointing: bool = False,
        weights: str | None = None,
        auto_resize: bool = True,
    ):
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        folder = DiffusersFolder(pretrained, FLUX_KONTEXT_FILES, "FluxKontextPolicy")
        d = torch_dtype(dtype)
        config = dict(
            pretrained=pretrained,
            dtype=dtype,
            guidance=guidance,
            max_sequence_length=max_sequence_length,
            auto_resize=auto_resize,
        )
        self._build(
            folder.load(FluxTransformer2DModel, "transformer", d),
            folder.load(AutoencoderKL, "vae", d),
            FluxTextEncoders(folder, d, max_sequence_length),
            guidance,
            text_device,
            gradient_checkpointing,
            config,
            auto_resize,
        )
        self.built_from_folder = True  # the frozen weights: the folder's (and `weights`)
        if weights is not None:
            self.base_weights = weights_reference(weights)
            load_policy_weights(self, weights)

    @classmethod
    def from_components(
        cls,
        transformer: nn.Module,
        vae: nn.Module,
        text: TextEmbedder,
        guidance: float = 2.5,
        text_device: str = "model",
        gradient_checkpointing: bool = False,
        auto_resize: bool = False,
    ) -> "FluxKontextPolicy":
        """A policy of in-memory parts (tests build tiny random ones): a
        `FluxTransformer2DModel`, an `AutoencoderKL` and a text embedder giving token
        features and a pooled vector. `auto_resize` is off by default here: tiny models
        edit at the images' own size."""
        policy = cls.__new__(cls)
        args = (guidance, text_device, gradient_checkpointing, None, auto_resize)
        policy._build(transformer, vae, text, *args)
        return policy

    def _build(
        self, transformer, vae, text, guidance, text_device, checkpointing, config, auto_resize
    ):
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        self._setup(transformer, vae, text, text_device, checkpointing, config, False, auto_resize)
        self.guidance = guidance
        # (width, height) pairs, as the pipeline lists them
        self.preferred_resolutions = list(PREFERRED_KONTEXT_RESOLUTIONS)
        channels = transformer.config.in_channels
        if channels != 4 * self.latent_channels:
            raise ValueError(
                f"the transformer takes {channels} input channels, but 2x2-packed latents of "
                f"this VAE have {4 * self.latent_channels}"
            )

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def preferred_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The pipeline's rule: the preferred resolution whose aspect ratio (width / height)
        is nearest the image's (ties: the narrower), floored to multiples of the token size."""
        aspect = image_size[1] / image_size[0]
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in self.preferred_resolutions)
        step = 2 * self.vae_scale_factor
        return h // step * step, w // step * step

    def shard_modules(self) -> list[nn.Module]:
        t = self.transformer
        return [*t.transformer_blocks, *t.single_transformer_blocks]

    def capture_processor(self):
        return FluxCaptureProcessor(self.recorder)

    def _encode_latents(self, x: Tensor) -> Tensor:
        c = self.vae.config
        z = self.vae.encode(x).latent_dist.mode()
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def _decode_latents(self, z: Tensor) -> Tensor:
        c = self.vae.config
        return self.vae.decode(z / c.scaling_factor + (c.shift_factor or 0.0)).sample

    def encode_condition(
        self, images: Tensor, instructions: Sequence[str], keys: Sequence[str] | None = None
    ) -> FluxCondition:
        images = self.to_edit_size(images)
        emb = self.embed_text(instructions, images, keys)
        if emb.pooled is None:
            raise ValueError(
                "FluxKontextPolicy needs a pooled instruction vector; the text embedder "
                f"{type(self.text.embedder).__name__} gives none"
            )
        latents = self._latents(images).to(self.latent_dtype)
        return FluxCondition(emb.text, emb.mask, latents, emb.pooled)

    def velocity(self, latents: Tensor, sigma: Tensor, condition: FluxCondition) -> Tensor:
        n, _, h, w = latents.shape
        hs, ws = condition.image.shape[-2:]
        dtype, device = self.latent_dtype, latents.device
        target = pack(latents.to(dtype))  # [N, T, 4C]
        source = pack(condition.image.to(dtype))  # [N, Ts, 4C]
        img_ids = torch.cat(
            [_grid_ids(h // 2, w // 2, 0, device), _grid_ids(hs // 2, ws // 2, 1, device)]
        )
        txt_ids = torch.zeros(condition.text.shape[1], 3, device=device)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance, device=device, dtype=torch.float32)
        if self._capturing is not None:
            self.recorder.start(condition.text.shape[1], target.shape[1])
        out = self.transformer(
            hidden_states=torch.cat([target, source], 1),
            encoder_hidden_states=condition.text.to(dtype),
            pooled_projections=condition.pooled.to(dtype),
            timestep=sigma.to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        if self._capturing is not None:
            self._capturing.append(self.recorder.finish(condition.text_mask, h // 2, w // 2))
        return unpack(out[:, : target.shape[1]], h, w)  # [N, C, h, w]


def _grid_ids(rows: int, cols: int, index: int, device) -> Tensor:
    """Position ids [rows * cols, 3] of a token grid: (index, row, col), row-major."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([torch.full_like(r, index), r, c], -1).float()
