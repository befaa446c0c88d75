"""Qwen-Image-Edit's real text path: a tiny random Qwen2.5-VL and its processor in a local
diffusers folder, loaded by `QwenImageEditPolicy` on first use and checked against diffusers'
`QwenImageEditPipeline.encode_prompt` built from the same components.

Nothing is downloaded: the tokenizer is byte-level BPE over the 256 byte symbols with no merges
(every byte one token) plus Qwen's special tokens, so the template's 64 dropped tokens are
bytes of its system prompt here, the same for the policy and the pipeline. The Qwen2.5-VL
config follows diffusers' own Qwen-Image-Edit test (hidden size 16, 2 layers, a 2-block
vision tower) with the vocabulary cut down to the tokenizer's."""

import numpy as np
import pytest
import torch
from test_backbones import SIZE, scenes, tiny_qwen_parts

from lit_grpo.policies import QwenImageEditPolicy

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
SPECIAL += ["<|image_pad|>", "<|video_pad|>"]
# the processor's default `min_pixels` (56 * 56) scales a 16 px source up to 56 px: 4 x 4
# patches of 14 px, merged 2 x 2 into 4 image tokens
IMAGE_TOKENS = 4


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's base alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def save_qwen_folder(root):
    """transformer/, vae/, text_encoder/ (tiny random Qwen2.5-VL) and processor/ (byte-level
    tokenizer, Qwen2-VL image and video processors) under `root`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {s: i for i, s in enumerate(byte_symbols())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIAL[1:])
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL}
    assert ids == {s: 256 + i for i, s in enumerate(SPECIAL)}  # appended after the bytes
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    processor.save_pretrained(root / "processor")
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    text |= dict(num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1e6)
    text |= dict(rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default"})
    text |= dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    config.vision_config.out_hidden_size = 16
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(root / "text_encoder")
    transformer, vae = tiny_qwen_parts()
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    save_qwen_folder(root)
    return root


def pipeline_of(policy):
    """diffusers' pipeline over the policy's own transformer, VAE, text encoder, processor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    processor, encoder = policy.text.embedder.models
    return QwenImageEditPipeline(
        FlowMatchEulerDiscreteScheduler(),
        policy.vae,
        encoder,
        processor.tokenizer,
        processor,
        policy.transformer,
    )


def pipeline_embedding(pipe, prompts, images):
    """`encode_prompt` on PIL images of the same bytes the policy's encoder sees; its mask
    made explicit (the pipeline returns None when no row is padded)."""
    from PIL import Image

    pictures = [
        Image.fromarray((im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        for im in images
    ]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(list(prompts), image=pictures, device="cpu")
    mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return embeds, mask


def expected_length(prompt: str, drop: int, template: str) -> int:
    """Tokens after the drop: one per byte, one per special token, the image pad expanded."""
    text = template.format(prompt)
    n = len(text.encode())
    for s in SPECIAL:
        n -= text.count(s) * (len(s) - 1)
    return n + text.count("<|image_pad|>") * (IMAGE_TOKENS - 1) - drop


def test_qwen_text_encoder_from_the_folder_matches_the_pipeline(folder):
    policy = QwenImageEditPolicy(
        pretrained=str(folder), dtype="float32", true_cfg=4.0, auto_resize=False
    )
    encoder = policy.text.embedder
    assert encoder.models is None  # loaded on first use
    batch = scenes()
    images, prompts = batch["source"], list(batch["instruction"])
    assert prompts[0] != prompts[1]
    cond = policy.encode_condition(images, prompts)
    assert encoder.models is not None

    pipe = pipeline_of(policy)
    embeds, mask = pipeline_embedding(pipe, prompts, images)
    assert cond.text.shape == embeds.shape and cond.text.shape[-1] == 16
    assert torch.equal(cond.text_mask, mask)
    assert torch.allclose(cond.text, embeds, atol=1e-6)
    neg, neg_mask = pipeline_embedding(pipe, [" ", " "], images)
    assert torch.equal(cond.negative_mask, neg_mask)
    assert torch.allclose(cond.negative_text, neg, atol=1e-6)
    # the lengths: the instruction's bytes, 4 image tokens, less the template's first 64
    lengths = [expected_length(p, 64, encoder.template) for p in prompts]
    assert cond.text_mask.sum(1).tolist() == lengths and encoder.drop == 64
    assert (cond.text[~cond.text_mask] == 0).all()

    # the source image reaches the encoder: a different image, a different embedding
    other = policy.encode_condition(images.flip(0), prompts)
    assert (other.text[0] - cond.text[0]).abs().max() > 1e-3
    assert torch.allclose(other.text, pipeline_embedding(pipe, prompts, images.flip(0))[0])

    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.3, 0.8]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_qwen_text_embeddings_are_cached_per_instruction_and_named_image(folder, monkeypatch):
    """The cache names a source image by the key the batch carries (`source_path`), never
    by its pixels: a cached row reads nothing of the image back to the host."""
    policy = QwenImageEditPolicy(
        pretrained=str(folder), dtype="float32", true_cfg=1.0, auto_resize=False
    )
    batch = scenes()
    images, prompts, keys = batch["source"], list(batch["instruction"]), ["a.png", "b.png"]
    first = policy.encode_condition(images, prompts, keys)
    assert first.negative_text.shape[1] == 0  # no negative pass without CFG
    calls = []
    _, model = policy.text.embedder.models
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)

    def read(*args, **kwargs):
        raise AssertionError("an image was read back to the host")

    with monkeypatch.context() as m:  # a cached row: no host read of any tensor
        for name in ("cpu", "numpy", "tolist", "item", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, read)
        again = policy.embed_text(prompts[::-1], images.flip(0), keys[::-1])
    assert calls == []  # both rows from the cache
    assert torch.equal(again.text, first.text.flip(0))
    # a new key is a new entry: one encoder call, for that row only
    changed = images.clone()
    changed[1] = 1 - changed[1]
    mixed = policy.encode_condition(changed, prompts, ["a.png", "c.png"])
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 1
    assert torch.equal(mixed.text[0], first.text[0])
    assert not torch.allclose(mixed.text[1], first.text[1])
    assert len(policy.text.entries) == 3
    # rows without keys are embedded on every call (no digest of the pixels), not kept
    for _ in range(2):
        unnamed = policy.encode_condition(changed, prompts)
    assert [c["input_ids"].shape[0] for c in calls] == [1, 2, 2]
    # the same embedding (up to batching: one row of mixed's was embedded alone)
    assert torch.allclose(unnamed.text, mixed.text, atol=1e-5)
    assert len(policy.text.entries) == 3
    assert np.isfinite(mixed.text.numpy()).all()
