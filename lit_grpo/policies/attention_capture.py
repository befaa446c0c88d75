"""Instruction-to-image attention maps from diffusers transformers, through attention processors.

diffusers computes attention inside fused kernels (SDPA) and never materialises the
probabilities, so a map needs its own pass: our processors below do what diffusers' own
processors for Flux (`FluxAttnProcessor`) and Qwen-Image (`QwenDoubleStreamAttnProcessor2_0`)
do, step for step and through the same attention dispatch (the velocity is unchanged), and
hand the rotated queries and keys to an `AttentionRecorder` on the way. The recorder takes
the instruction tokens' rows of the attention (softmax over every key, padding keys
excluded), keeps the target-image columns and averages the heads; the policy averages the
layers.

Both backbones order the joint sequence [text tokens | target tokens | condition tokens];
the recorder is told the text and target lengths before each forward.

diffusers is imported inside the processors' calls (it costs seconds at start-up).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class AttentionRecorder:
    """Collects text-to-target attention [N, L, T] from every attention layer of one forward."""

    def __init__(self):
        self.layers: list[Tensor] = []
        self.n_text = self.n_target = 0
        self.key_mask: Tensor | None = None
        self.active = False

    def start(self, n_text: int, n_target: int, key_mask: Tensor | None = None) -> None:
        """Before a forward: L text tokens first, then T target tokens; `key_mask` [N, S] is
        False on keys no query may attend to (text padding), None if every key counts."""
        self.layers, self.active = [], True
        self.n_text, self.n_target, self.key_mask = n_text, n_target, key_mask

    def record(self, query: Tensor, key: Tensor) -> None:
        """query, key [N, S, heads, head_dim] as the attention sees them (normed, rotated)."""
        if not self.active:
            return
        n_text, n_target = self.n_text, self.n_target
        q = query[:, :n_text].transpose(1, 2).float()  # [N, H, L, D]
        k = key.transpose(1, 2).float()  # [N, H, S, D]
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [N, H, L, S]
        if self.key_mask is not None:
            logits = logits.masked_fill(~self.key_mask[:, None, None, :], float("-inf"))
        probs = logits.softmax(-1)[..., n_text : n_text + n_target]
        self.layers.append(probs.mean(1))  # [N, L, T], heads averaged

    def finish(self, text_mask: Tensor, rows: int, cols: int) -> Tensor:
        """After the forward: [N, L, rows, cols], layers averaged, padding rows 0."""
        self.active = False
        if not self.layers:
            raise RuntimeError("no attention layer reported to the recorder during the forward")
        maps = torch.stack(self.layers).mean(0) * text_mask[..., None].to(torch.float32)
        self.layers = []
        return maps.view(maps.shape[0], maps.shape[1], rows, cols)


@contextmanager
def processors_swapped(
    transformer: nn.Module, make: Callable[[nn.Module], object]
) -> Iterator[None]:
    """Give every attention module of `transformer` the processor `make(module)` returns;
    the original processors are back afterwards, even on error."""
    modules = [m for m in transformer.modules() if hasattr(m, "set_processor")]
    originals = [m.processor for m in modules]
    for m in modules:
        m.set_processor(make(m))
    try:
        yield
    finally:
        for m, processor in zip(modules, originals):
            m.set_processor(processor)


class FluxCaptureProcessor:
    """diffusers' `FluxAttnProcessor` (joint and single-stream blocks) that also reports the
    rotated queries and keys to a recorder."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, e_query, e_key, e_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        split = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [N, S, H, D]
        query, key, value = attn.norm_q(split(query)), attn.norm_k(split(key)), split(value)
        if attn.added_kv_proj_dim is not None:  # joint block: the text stream comes first
            e_query, e_key = attn.norm_added_q(split(e_query)), attn.norm_added_k(split(e_key))
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([split(e_value), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        self.recorder.record(query, key)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # single-stream block: no output projection here
            return out
        n_text = encoder_hidden_states.shape[1]
        text, image = out[:, :n_text], out[:, n_text:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


class QwenCaptureProcessor:
    """diffusers' `QwenDoubleStreamAttnProcessor2_0` that also reports the rotated queries and
    keys (text stream first, as the joint attention orders them) to a recorder."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = encoder_hidden_states_mask.new_ones(hidden_states.shape[:2])
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        split = lambda t: t.unflatten(-1, (-1, head_dim))  # noqa: E731  [N, S, H, D]
        img_q, img_k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        img_v = split(attn.to_v(hidden_states))
        txt_q = split(attn.add_q_proj(encoder_hidden_states))
        txt_k = split(attn.add_k_proj(encoder_hidden_states))
        txt_v = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        query = torch.cat([txt_q, img_q], dim=1)
        key = torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)
        self.recorder.record(query, key)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        out = out.flatten(2, 3).to(query.dtype)
        n_text = encoder_hidden_states.shape[1]
        image = attn.to_out[0](out[:, n_text:].contiguous())
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)
        return image, attn.to_add_out(out[:, :n_text].contiguous())
