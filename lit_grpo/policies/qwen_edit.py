"""Qwen-Image-Edit behind the `EditPolicy` contract (diffusers `QwenImageTransformer2DModel`).

What the policy does, as diffusers' `QwenImageEditPipeline` does it:
- latents: `AutoencoderKLQwenImage` (a video VAE: 5-D input `[N, 3, 1, H, W]`), its mode
  normalised as `(z - latents_mean) / latents_std`, packed into 2x2 patches;
- the condition image: the source's latents, packed, after the target tokens on the
  sequence axis, with `img_shapes = [(1, h/2, w/2), (1, hs/2, ws/2)]` per row for the
  rotary positions; the output is sliced back to the target tokens;
- text: Qwen2.5-VL's last hidden states of the pipeline's edit template, which shows the
  encoder the source image too (the template's system prefix dropped), padding masked;
- noise level: `timestep = sigma` (the pipeline passes t / 1000), prediction `noise - x0`;
- guidance: true classifier-free guidance with the pipeline's norm rescale,
      comb = neg + s (cond - neg);  v = comb * |cond| / |comb|   (norms per token),
  computed by `velocity` itself, so the rollouts and the training forward (the ratio's
  numerator) use the very same guided velocity. `true_cfg <= 1` runs the conditional pass
  alone (half the cost; the pipeline's default scale is 4.0).

- size: with `auto_resize` (the default) the source is resized to the pipeline's size for
  its aspect ratio, an area of `target_area` (1024 x 1024) in sides of multiples of 32
  (diffusers' `calculate_dimensions`), for the text encoder and the condition latents
  alike, and the edit is made at that size; the decoded edits are resized back to the
  source's size (`decode_to`).

Where we depart from the pipeline, on purpose: images are resized as tensors (bicubic,
antialiased) where the pipeline resizes PIL images with Lanczos.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_grpo.policies.attention_capture import QwenCaptureProcessor
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
from lit_grpo.policies.qwen_text_length import no_text_length_sync
from lit_grpo.policies.weights import load_policy_weights, weights_reference

# what QwenImageEditPolicy loads from its folder (docs/backbones.md lists the files); the
# processor's image settings are in preprocessor_config.json (processor_config.json where
# a newer transformers saved it), its tokenizer in tokenizer.json or vocab.json + merges.txt
QWEN_IMAGE_EDIT_FILES = (
    diffusers_model("transformer", "QwenImageTransformer2DModel"),
    diffusers_model("vae", "AutoencoderKLQwenImage"),
    transformers_model("text_encoder", "Qwen2.5-VL"),
    Component(
        "processor",
        "Qwen2.5-VL's processor",
        files=(
            (("preprocessor_config.json",), ("processor_config.json",)),
            (("tokenizer.json",), ("vocab.json", "merges.txt")),
        ),
    ),
)


@dataclass
class QwenCondition(Condition):
    """`Condition` plus the negative prompt's embedding for true CFG: negative_text
    [N, Ln, D], negative_mask [N, Ln] (Ln = 0 when CFG is off)."""

    negative_text: Tensor | None = None
    negative_mask: Tensor | None = None


class QwenVLTextEncoder:
    """Qwen-Image-Edit's text encoder from the folder, loaded on first use: Qwen2.5-VL
    (`text_encoder/`) and its processor (`processor/`), run on the pipeline's edit template
    (read from the installed diffusers, so the two never drift apart)."""

    uses_image = True

    def __init__(self, folder: DiffusersFolder, dtype: torch.dtype):
        self.folder, self.dtype = folder, dtype
        self.device = "cpu"
        self.models = None

    def _load(self):
        from diffusers import QwenImageEditPipeline
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

        empty = QwenImageEditPipeline(None, None, None, None, None, None)
        self.template = empty.prompt_template_encode
        self.drop = empty.prompt_template_encode_start_idx
        self.models = (
            self.folder.load(Qwen2VLProcessor, "processor"),
            self.folder.load(Qwen2_5_VLForConditionalGeneration, "text_encoder", self.dtype),
        )

    def __call__(self, instructions: Sequence[str], images: Tensor) -> TextEmbedding:
        if self.models is None:
            self._load()
        processor, model = self.models
        model.to(self.device)
        pictures = [
            (im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for im in images
        ]
        inputs = processor(
            text=[self.template.format(t) for t in instructions],
            images=pictures,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        ).hidden_states[-1]
        rows = [h[m.bool()][self.drop :] for h, m in zip(hidden, inputs["attention_mask"])]
        length = max(r.shape[0] for r in rows)
        text = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=hidden.device)
        for i, r in enumerate(rows):
            text[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return TextEmbedding(text, mask)


class QwenImageEditPolicy(DiffusersEditPolicy):
    """Qwen-Image-Edit from a local diffusers folder (see the module docstring).

    Args:
        pretrained: the local diffusers folder (`model_index.json`, `transformer/`, `vae/`,
            `text_encoder/`, `processor/`, `tokenizer/`).
        dtype: weights of the transformer, VAE and text encoder; LoRA weights stay float32.
        true_cfg: the true-CFG scale (the pipeline's `true_cfg_scale`, 4.0 by default);
            <= 1 turns the negative pass off.
        negative_prompt: the negative prompt of true CFG (" " as in Qwen's examples).
        text_device: where the frozen Qwen2.5-VL runs: "model" or "cpu".
        gradient_checkpointing: recompute each transformer block in the backward pass.
        weights: a lit_grpo weights file or checkpoint of this policy, loaded over the
            folder's (checkpoints then keep the LoRA adapter and name this file, which must
            stay readable: docs/backbones.md).
        auto_resize: edit every source at the pipeline's size for its aspect ratio (about
            1 MP, sides multiples of 32) and resize the edits back to the source's size;
            False: at the source's own size (sides multiples of 16).
    """

    lora_targets = [
        "to_q", "to_k", "to_v", "to_out.0",  # attention projections, both streams
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
        "img_mod.1", "txt_mod.1",  # adaLN modulation
    ]  # fmt: skip

    def __init__(
        self,
        pretrained: str,
        dtype: str = "bfloat16",
        true_cfg: float = 4.0,
        negative_prompt: str = " ",
        text_device: str = "model",
        gradient_checkpointing: bool = False,
        weights: str | None = None,
        auto_resize: bool = True,
    ):
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        folder = DiffusersFolder(pretrained, QWEN_IMAGE_EDIT_FILES, "QwenImageEditPolicy")
        d = torch_dtype(dtype)
        config = dict(pretrained=pretrained, dtype=dtype, true_cfg=true_cfg)
        config["auto_resize"] = auto_resize
        self._build(
            folder.load(QwenImageTransformer2DModel, "transformer", d),
            folder.load(AutoencoderKLQwenImage, "vae", d),
            QwenVLTextEncoder(folder, d),
            true_cfg,
            negative_prompt,
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
        true_cfg: float = 4.0,
        negative_prompt: str = " ",
        text_device: str = "model",
        gradient_checkpointing: bool = False,
        auto_resize: bool = False,
    ) -> "QwenImageEditPolicy":
        """A policy of in-memory parts (tests build tiny random ones): a
        `QwenImageTransformer2DModel`, an `AutoencoderKLQwenImage` and a text embedder.
        `auto_resize` is off by default here: tiny models edit at the images' own size."""
        policy = cls.__new__(cls)
        args = (true_cfg, negative_prompt, text_device, gradient_checkpointing, None, auto_resize)
        policy._build(transformer, vae, text, *args)
        return policy

    def _build(self, transformer, vae, text, cfg, negative, text_device, ckpt, config, resize):
        self._setup(transformer, vae, text, text_device, ckpt, config, True, resize)
        self.true_cfg, self.negative_prompt = cfg, negative
        self.target_area = 1024 * 1024  # the pipeline's (`calculate_dimensions(1024 * 1024, .)`)
        # the VAE's normalisation, on the policy's device (no host copy per encode or decode)
        c = vae.config
        self.register_buffer("latents_mean", torch.tensor(c.latents_mean), persistent=False)
        self.register_buffer("latents_std", torch.tensor(c.latents_std), persistent=False)
        if transformer.config.in_channels != 4 * self.latent_channels:
            raise ValueError(
                f"the transformer takes {transformer.config.in_channels} input channels, but "
                f"2x2-packed latents of this VAE have {4 * self.latent_channels}"
            )

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    def preferred_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The pipeline's rule: `target_area` at the image's aspect ratio, each side rounded
        to a multiple of 32 (diffusers' `calculate_dimensions`), floored to the token size."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        width, height, _ = calculate_dimensions(self.target_area, image_size[1] / image_size[0])
        step = 2 * self.vae_scale_factor
        return int(height) // step * step, int(width) // step * step

    def shard_modules(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def capture_processor(self):
        return QwenCaptureProcessor(self.recorder)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        view = lambda v: v.to(like.device, like.dtype).view(1, -1, 1, 1)  # noqa: E731
        return view(self.latents_mean), view(self.latents_std)

    def _encode_latents(self, x: Tensor) -> Tensor:
        z = self.vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]  # [N, C, h, w]
        mean, std = self._stats(z)
        return (z - mean) / std

    def _decode_latents(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return self.vae.decode((z * std + mean).unsqueeze(2)).sample[:, :, 0]

    def encode_condition(
        self, images: Tensor, instructions: Sequence[str], keys: Sequence[str] | None = None
    ) -> QwenCondition:
        images = self.to_edit_size(images)
        emb = self.embed_text(instructions, images, keys)
        if self.true_cfg > 1:
            neg = self.embed_text([self.negative_prompt] * len(instructions), images, keys)
        else:  # no negative pass: empty tensors keep the condition indexable
            neg = TextEmbedding(emb.text[:, :0], emb.mask[:, :0])
        latents = self._latents(images).to(self.latent_dtype)
        return QwenCondition(emb.text, emb.mask, latents, neg.text, neg.mask)

    def velocity(self, latents: Tensor, sigma: Tensor, condition: QwenCondition) -> Tensor:
        n, _, h, w = latents.shape
        hs, ws = condition.image.shape[-2:]
        dtype = self.latent_dtype
        target = pack(latents.to(dtype))  # [N, T, 4C]
        tokens = torch.cat([target, pack(condition.image.to(dtype))], 1)  # [N, T + Ts, 4C]
        n_target = target.shape[1]
        shapes = [[(1, h // 2, w // 2), (1, hs // 2, ws // 2)]] * n

        def forward(text: Tensor, mask: Tensor, record: bool) -> Tensor:  # [N, T, 4C]
            if record:
                keys = torch.cat([mask, mask.new_ones(n, tokens.shape[1])], 1)
                self.recorder.start(text.shape[1], n_target, keys)
            with no_text_length_sync():  # diffusers' host sync it discards (qwen_text_length)
                out = self.transformer(
                    hidden_states=tokens,
                    encoder_hidden_states=text.to(dtype),
                    encoder_hidden_states_mask=mask,
                    timestep=sigma.to(dtype),
                    img_shapes=shapes,
                    return_dict=False,
                )[0][:, :n_target]
            if record:
                self._capturing.append(self.recorder.finish(mask, h // 2, w // 2))
            return out

        pred = forward(condition.text, condition.text_mask, self._capturing is not None)
        if self.true_cfg > 1:
            pred = true_cfg(
                pred,
                forward(condition.negative_text, condition.negative_mask, False),
                self.true_cfg,
            )
        return unpack(pred, h, w)  # [N, C, h, w]


def true_cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's true CFG with norm rescale over the last (token feature) axis:
    `comb = uncond + scale (cond - uncond)`, rescaled to the conditional prediction's norm."""
    comb = uncond + scale * (cond - uncond)
    return comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
