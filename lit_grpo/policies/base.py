"""The `EditPolicy` contract every backbone implements.

Samplers, rewards and LightningModules talk to a backbone only through this class, so they
never branch on which backbone runs. A policy owns everything backbone-specific: how images
become latents, how the condition (source image + instruction) is encoded and where it
enters the network, which modules get LoRA, and how latent tokens map to pixels.

Latents follow lit_grpo's flow convention (`lit_grpo.sampling.flow`): the policy predicts
`v = noise - x0` at noise level `sigma` in [0, 1].
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
from torch import Tensor, nn

from lit_grpo.policies.lora import LoraSettings, adapters_disabled, add_lora, has_lora
from lit_grpo.sampling.flow import randn_like
from lit_grpo.sampling.ode import SourceBlend, sample_ode


@dataclass
class Condition:
    """An encoded editing condition, computed once per (source image, instruction).

    text:       [N, L, D] instruction token features
    text_mask:  [N, L] bool, True on real (non-padding) tokens
    image:      [N, C, h, w] source-image latents (the Kontext-style extra tokens)
    """

    text: Tensor
    text_mask: Tensor
    image: Tensor

    def repeat_interleave(self, repeats: int) -> "Condition":
        """Each condition `repeats` times in a row: the layout of a rollout group."""
        return replace(
            self,
            **{f.name: getattr(self, f.name).repeat_interleave(repeats, 0) for f in fields(self)},
        )

    def __getitem__(self, index) -> "Condition":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})


class EditPolicy(nn.Module, ABC):
    """A flow-matching image editor: encode, predict velocity, decode.

    Images are float `[N, 3, H, W]` in [0, 1] everywhere outside the policy.
    """

    # The largest image side `edit` should take, where the policy's cost makes larger edits
    # impractical; None: the data's limit (`shapeworld.MAX_RESOLUTION`) is the only one.
    max_edit_side: int | None = None

    @abstractmethod
    def encode_images(self, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] -> latents [N, C, h, w] (the data point x0) of the
        images at `edit_size`."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, C, h, w] -> images [N, 3, H, W] in [0, 1]."""

    @abstractmethod
    def encode_condition(
        self, images: Tensor, instructions: Sequence[str], keys: Sequence[str] | None = None
    ) -> Condition:
        """Encode source images and instructions once; samplers reuse it for every step.

        `keys`: one string per row naming its source image (a batch's `source_path`), so that
        a policy may cache what it computes from the image without reading the image back to
        the host; None where nothing names the images (such a policy then does not cache)."""

    @abstractmethod
    def velocity(self, latents: Tensor, sigma: Tensor, condition: Condition) -> Tensor:
        """Predicted velocity [N, C, h, w] at noise level sigma [N]."""

    def velocity_fn(self, condition: Condition):
        """`(latents, sigma) -> velocity` for a fixed condition: what samplers call."""
        return partial(self.velocity, condition=condition)

    # Shapes: what samplers and region methods need to know of the latent space.
    def edit_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) at which the policy edits an image of `image_size` (H, W) pixels: its
        latents, tokens and `decode`d images have this size. The image's own size here; a
        backbone with preferred resolutions (FLUX.1-Kontext, Qwen-Image-Edit) resizes its
        inputs to them, and `decode_to` maps its edits back."""
        return int(image_size[0]), int(image_size[1])

    def decode_to(self, latents: Tensor, size: tuple[int, int]) -> Tensor:
        """Latents -> images [N, 3, H, W] in [0, 1] at `size` (the source's, which rewards,
        metrics and masks share): `decode`, then resized (bicubic, antialiased, clamped:
        ours) where the policy edits at another size (`edit_size`)."""
        images = self.decode(latents)
        return resize_images(images, size)

    @abstractmethod
    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of (H, W) pixels (edited at `edit_size`)."""

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the denoiser takes its latents in (samplers keep their own in float32)."""
        return next(self.denoiser.parameters()).dtype

    @abstractmethod
    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the latent token grid for an image of (H, W) pixels."""

    def pixel_to_tokens(self, masks: Tensor) -> Tensor:
        """Pixel masks [N, H, W] -> fraction of each latent token they cover [N, rows * cols].

        Region methods use this to move masks between pixels and tokens without knowing the
        backbone; the default assumes the token grid tiles the image evenly.
        """
        rows, cols = self.token_grid(tuple(masks.shape[-2:]))
        cover = nn.functional.adaptive_avg_pool2d(masks.float().unsqueeze(1), (rows, cols))
        return cover.flatten(1)

    def tokens_to_pixels(self, values: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Per-token values [N, rows * cols] -> [N, H, W]: each pixel takes its token's value
        (the inverse direction of `pixel_to_tokens`, for attention maps and token advantages)."""
        rows, cols = self.token_grid(image_size)
        grid = values.reshape(values.shape[0], 1, rows, cols).float()
        return nn.functional.interpolate(grid, size=tuple(image_size), mode="nearest")[:, 0]

    def latent_to_tokens(self, values: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Per-latent-element values [N, C, h, w] -> per-token means [N, rows * cols] (region
        methods reduce per-element log-probabilities to tokens with it); the default assumes
        the token grid tiles the latent evenly."""
        rows, cols = self.token_grid(image_size)
        pooled = nn.functional.adaptive_avg_pool2d(
            values.float().mean(1, keepdim=True), (rows, cols)
        )
        return pooled.flatten(1)

    def latent_masks(self, masks: Tensor) -> Tensor:
        """Pixel masks [N, H, W] -> coverage [N, h, w] at latent resolution (region noise)."""
        _, h, w = self.latent_shape(tuple(masks.shape[-2:]))
        return nn.functional.adaptive_avg_pool2d(masks.float().unsqueeze(1), (h, w))[:, 0]

    @contextmanager
    def capture_attention(self, enabled: bool = True) -> Iterator[list[Tensor]]:
        """While active, every `velocity` call appends the instruction-to-image attention
        [N, L, rows, cols] (instruction tokens over the target-image tokens) to the yielded
        list. `enabled=False` yields an empty list and captures nothing."""
        if enabled:
            raise NotImplementedError(
                f"{type(self).__name__} does not expose attention maps; the attention-based "
                "rewards need a policy that implements capture_attention"
            )
        yield []

    def phrase_tokens(self, instructions: Sequence[str], phrases: Sequence[str]) -> Tensor:
        """[N, L] bool: the tokens of each instruction that spell its phrase (the object an
        edit names), on the L axis of the `capture_attention` maps; a row whose phrase does
        not occur in its instruction is all False. Attention rewards that read one object's
        attention (InstructRL4Pix's) need it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not map phrases to its instruction tokens; the "
            "object-attention reward needs a policy that implements phrase_tokens"
        )

    # LoRA and the reference view, shared by every backbone through peft.
    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that LoRA adapts (the transformer; never the VAE or text encoder)."""

    def shard_modules(self) -> list[nn.Module]:
        """The modules that become one FSDP unit each when the policy is sharded (their
        parameters are gathered together, one unit at a time): the denoiser's transformer
        blocks. The default finds every `nn.ModuleList` directly under the denoiser whose
        name ends in "blocks" (`blocks`, diffusers' `transformer_blocks` and
        `single_transformer_blocks`); a backbone laid out otherwise overrides it."""
        found = [
            block
            for name, child in self.denoiser.named_children()
            if isinstance(child, nn.ModuleList) and name.endswith("blocks")
            for block in child
        ]
        if not found:
            raise NotImplementedError(
                f"{type(self).__name__}.shard_modules: its denoiser "
                f"({type(self.denoiser).__name__}) has no ModuleList named '*blocks'; "
                "override shard_modules to name its transformer blocks"
            )
        return found

    def checkpoint_activations(self, enabled: bool = True) -> None:
        """Activation checkpointing of the denoiser's blocks (`shard_modules`): with grad
        enabled, each block keeps only its inputs and recomputes its activations in the
        backward pass (`torch.utils.checkpoint`, non-reentrant); without grad (sampling)
        blocks run as they are. Memory of a training forward drops to about one block's
        activations, at the cost of a second forward of every block in the backward pass.
        The blocks' `forward` is replaced on the instance, so parameter names, state dicts,
        LoRA and FSDP units stay as they are.

        The one switch for activation checkpointing: `TinyEditPolicy(activation_checkpointing=)`,
        the diffusers policies' `gradient_checkpointing` (which override this method with
        diffusers' own mechanism) and `ShardingSettings.activation_checkpointing` all call
        it, so two mechanisms never wrap the same block; calling it twice is a no-op."""
        for block in self.shard_modules():
            wrapped = _is_checkpointed(block)
            if enabled and not wrapped:
                block.forward = partial(_checkpointed, block, type(block).forward)
            elif not enabled and wrapped:
                del block.forward

    @property
    def checkpointing_activations(self) -> bool:
        """Whether the blocks recompute their activations (`checkpoint_activations`)."""
        return any(_is_checkpointed(block) for block in self.shard_modules())

    def add_lora(self, settings: LoraSettings) -> None:
        """Freeze the policy and attach a trainable LoRA adapter to the denoiser."""
        self.requires_grad_(False)
        add_lora(self.denoiser, settings)

    def prepare_training(self, lora: LoraSettings | None, full: str = "denoiser") -> None:
        """What a stage trains: a LoRA adapter on the denoiser, or without one every
        parameter (`full="all"`, SFT from scratch) or the denoiser alone (`"denoiser"`: the
        condition encoders stay frozen, so an encoding can be reused by the update)."""
        if lora is not None:
            self.add_lora(lora)
        elif full == "denoiser":
            self.requires_grad_(False)
            self.denoiser.requires_grad_(True)
        elif full != "all":
            raise ValueError(f"full must be 'denoiser' or 'all', got {full!r}")

    @property
    def has_lora(self) -> bool:
        return has_lora(self.denoiser)

    # --- what a checkpoint must hold -----------------------------------------------------------
    @property
    def frozen_from_source(self) -> bool:
        """Whether the constructor reloads every frozen weight from local files (a diffusers
        policy built from its `pretrained` folder alone, with a LoRA adapter). A stage's
        checkpoints then leave those weights (`source_state_keys`) out and keep the rest.
        False here: a checkpoint holds every weight."""
        return False

    def source_state_keys(self) -> set[str]:
        """The `state_dict` keys whose tensors the constructor reloads from its source: the
        frozen parameters and the buffers (never the LoRA adapter, never a trainable one)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if k not in trainable and "lora_" not in k}

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy for KL: the same network with the adapter switched off."""
        if not self.has_lora:
            raise RuntimeError(
                "the reference view needs a LoRA adapter (call add_lora first); without one "
                "the policy and its reference would be the same network"
            )
        with adapters_disabled(self.denoiser):
            yield

    @torch.no_grad()
    def edit(
        self,
        source: Tensor,
        instructions: Sequence[str],
        steps: int = 10,
        shift: float = 1.0,
        generator: torch.Generator | None = None,
        keys: Sequence[str] | None = None,
        editable: Tensor | None = None,
    ) -> Tensor:
        """ODE-sampled edits [N, 3, H, W] in [0, 1], the source's size: the evaluation
        sampler of every stage (`keys` as in `encode_condition`).

        `editable`: pixel masks [N, H, W] at the source's size, True where the edit may
        change the image; the sampler then keeps the source outside them at every step
        (`SourceBlend`, an inference option). A latent is editable if any of its pixels is
        (ours: the region is never shrunk to the latent grid), so a policy whose latents
        are coarser than pixels may change a margin of up to one latent around the mask,
        and outside it returns its decoder's reconstruction of the source."""
        cond = self.encode_condition(source, instructions, keys)
        x0 = self.encode_images(source)
        noise = randn_like(x0, generator)
        blend = None
        if editable is not None:
            if tuple(editable.shape) != (source.shape[0], *source.shape[-2:]):
                raise ValueError(
                    f"editable masks {tuple(editable.shape)} do not match the sources "
                    f"{tuple(source.shape)}: one [H, W] mask per source image"
                )
            region = (self.latent_masks(editable.to(x0.device)) > 0).unsqueeze(1)
            blend = SourceBlend(source=x0.float(), editable=region)
        latents = sample_ode(self.velocity_fn(cond), noise, steps, shift, blend)
        return self.decode_to(latents, tuple(source.shape[-2:]))


def resize_images(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] resized to `size` (bicubic, antialiased when shrinking,
    clamped to [0, 1]: ours; diffusers' pipelines resize PIL images with Lanczos); returned
    as they are when they already have that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    out = nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True)
    return out.clamp(0, 1)


def _is_checkpointed(block: nn.Module) -> bool:
    forward = vars(block).get("forward")
    return isinstance(forward, partial) and forward.func is _checkpointed


def _checkpointed(block: nn.Module, forward, *args, **kwargs):
    """`forward(block, ...)` under `torch.utils.checkpoint` when a backward pass will need
    its activations (grad enabled), plainly otherwise."""
    if not torch.is_grad_enabled():
        return forward(block, *args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
