"""FLUX.1-Kontext and Qwen-Image-Edit policies on tiny random diffusers models (CPU).

The tiny configurations follow diffusers' own pipeline tests; the text encoders are replaced
by `WordEmbedder` (the real ones, loaded from a local folder, are tested on tiny random
encoders in test_backbone_files.py and test_qwen_text.py)."""

import copy

import pytest
import torch
from helpers import Brightness, lora_params, quiet_trainer, shapeworld_batch, tiny_data

from lit_grpo.modules import GRPOModule, RCGRPOModule, SFTModule
from lit_grpo.objectives import FlowGRPO
from lit_grpo.policies import FluxKontextPolicy, LoraSettings, QwenImageEditPolicy
from lit_grpo.policies.diffusers_common import WordEmbedder
from lit_grpo.policies.qwen_edit import true_cfg
from lit_grpo.rewards import AttentionConcentrationReward

SIZE = 16  # ShapeWorld images: 16 px -> Flux tokens 4 x 4 (VAE /2), Qwen 2 x 2 (VAE /4)


def tiny_flux_parts():
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,  # 2 latent channels, 2x2-packed
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return transformer, vae


def tiny_qwen_parts():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[2.0, 1.5, 1.0, 0.5],
    )
    return transformer, vae


def flux_policy(**kw):
    transformer, vae = tiny_flux_parts()
    return FluxKontextPolicy.from_components(transformer, vae, WordEmbedder(32, 32), **kw)


def qwen_policy(**kw):
    transformer, vae = tiny_qwen_parts()
    return QwenImageEditPolicy.from_components(transformer, vae, WordEmbedder(16), **kw)


BACKBONES = {"flux": flux_policy, "qwen": qwen_policy}


def scenes(n=2, tasks=("translate",)):
    return shapeworld_batch(n, SIZE, tasks)


def unchanged(before, after):
    """LoRA weights that did not move, less the ones no gradient can reach: Qwen's last block
    sends only its image stream on, so LoRA on that block's text-side query, text output
    and text MLP cannot change the velocity (Flux's single-stream blocks read both streams)."""
    dead = ("transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_add_out")
    dead += ("transformer_blocks.1.txt_mlp",)
    qwen = any("txt_mlp" in n for n in before)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    if qwen:
        assert not any(d in n for n in moved for d in dead)
    return [n for n in before if n not in moved and not (qwen and any(d in n for d in dead))]


def quiet_fit(module, steps=2, callbacks=(), root=None, **data):
    trainer = quiet_trainer(
        max_steps=steps,
        max_epochs=10,
        callbacks=list(callbacks),
        default_root_dir=root,
        enable_checkpointing=root is not None,
    )
    trainer.fit(module, tiny_data(**{"resolution": SIZE, "val_size": 2, **data}))
    return trainer


# --- the contract: shapes, VAE scaling, velocity ---------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_and_the_vae_round_trip(name):
    policy = BACKBONES[name]()
    batch = scenes()
    latents = policy.encode_images(batch["source"])
    c, h, w = policy.latent_shape((SIZE, SIZE))
    assert latents.shape == (2, c, h, w) and latents.dtype == torch.float32
    rows, cols = policy.token_grid((SIZE, SIZE))
    assert (rows, cols) == (h // 2, w // 2)
    images = policy.decode(latents)
    assert images.shape == (2, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="multiples of"):
        policy.encode_images(torch.zeros(1, 3, SIZE + 2, SIZE))


@pytest.mark.parametrize("name", BACKBONES)
def test_blended_edit_keeps_the_source_latents_outside_the_grown_mask(name):
    policy = BACKBONES[name]().eval()
    policy.decode_to = lambda latents, size: latents  # look at the sampled latents
    source = scenes()["source"]
    editable = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    editable[:, :, :5] = True  # pixel columns 0-4
    edit = lambda mask: policy.edit(  # noqa: E731
        source, ["move the red circle left"] * 2, 2, generator=torch.Generator(), editable=mask
    )
    latents, x0 = edit(editable), policy.encode_images(source)
    factor = SIZE // x0.shape[-1]  # pixels per latent
    grown = -(-5 // factor)  # latent columns holding any editable pixel
    assert torch.equal(latents[..., grown:], x0[..., grown:])
    assert (latents[..., :grown] - x0[..., :grown]).abs().amin() > 0
    assert torch.equal(edit(torch.ones_like(editable)), edit(None))


def test_flux_latents_are_the_vae_mode_shifted_and_scaled():
    policy = flux_policy()
    images = scenes()["source"]
    z = policy.vae.encode(images * 2 - 1).latent_dist.mode()
    expected = (z - 0.0609) * 1.5035
    assert torch.allclose(policy.encode_images(images), expected, atol=1e-6)


def test_qwen_latents_are_the_5d_vae_mode_normalised_per_channel():
    policy = qwen_policy()
    images = scenes()["source"]
    z = policy.vae.encode((images * 2 - 1).unsqueeze(2)).latent_dist.mode()[:, :, 0]
    mean = torch.tensor([0.1, -0.2, 0.0, 0.3]).view(1, 4, 1, 1)
    std = torch.tensor([2.0, 1.5, 1.0, 0.5]).view(1, 4, 1, 1)
    assert torch.allclose(policy.encode_images(images), (z - mean) / std, atol=1e-6)


def test_flux_velocity_is_the_transformer_on_target_then_condition_tokens():
    """What FluxKontextPipeline feeds the transformer, written out by hand."""
    policy = flux_policy(guidance=3.0)
    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    sigma = torch.tensor([0.3, 0.8])
    packed = lambda z: z.view(2, 2, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 8)  # noqa: E731
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    source_ids = ids.clone()
    source_ids[..., 0] = 1
    with torch.no_grad():
        out = policy.transformer(
            hidden_states=torch.cat([packed(x), packed(cond.image)], 1),
            encoder_hidden_states=cond.text,
            pooled_projections=cond.pooled,
            timestep=sigma,  # the pipeline's t / 1000
            img_ids=torch.cat([ids.view(16, 3), source_ids.view(16, 3)]),
            txt_ids=torch.zeros(cond.text.shape[1], 3),
            guidance=torch.full((2,), 3.0),
            return_dict=False,
        )[0][:, :16]
        v = policy.velocity(x, sigma, cond)
    expected = out.view(2, 4, 4, 2, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 2, 8, 8)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(v, expected)
    with torch.no_grad():  # the guidance embedding is live
        assert not torch.equal(flux_policy(guidance=1.0).velocity(x, sigma, cond), v)


def test_qwen_true_cfg_is_the_norm_rescaled_combination_and_off_at_scale_one():
    policy = qwen_policy(true_cfg=4.0)
    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    sigma = torch.tensor([0.3, 0.8])
    plain = qwen_policy(true_cfg=1.0)
    with torch.no_grad():
        guided = policy.velocity(x, sigma, cond)
        positive = plain.velocity(x, sigma, cond)
        negative_cond = copy.copy(cond)
        negative_cond.text, negative_cond.text_mask = cond.negative_text, cond.negative_mask
        negative = plain.velocity(x, sigma, negative_cond)
    assert plain.encode_condition(batch["source"], batch["instruction"]).negative_text.shape[1] == 0
    pack = lambda v: v.view(2, 4, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 16)  # noqa: E731
    comb = pack(negative) + 4.0 * (pack(positive) - pack(negative))
    want = comb * pack(positive).norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    assert torch.allclose(pack(guided), want, atol=1e-6)
    assert not torch.allclose(guided, positive)
    # by hand, on one token: the rescale keeps the conditional norm
    c, u = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 4.0]])
    assert torch.allclose(true_cfg(c, u, 2.0), torch.tensor([[6.0, 4.0]]) * 5 / 52**0.5)


@pytest.mark.parametrize("name", BACKBONES)
def test_attention_capture_maps_instruction_tokens_onto_the_target_grid(name):
    policy = BACKBONES[name]()
    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    sigma = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        plain = policy.velocity(x, sigma, cond)
        with policy.capture_attention() as maps:
            captured = policy.velocity(x, sigma, cond)
            policy.velocity(x, sigma, cond)
    assert torch.equal(plain, captured)  # our processors compute what diffusers' do
    rows, cols = policy.token_grid((SIZE, SIZE))
    assert len(maps) == 2 and maps[0].shape == (2, cond.text.shape[1], rows, cols)
    mass = maps[0].sum((-1, -2))  # share of each instruction token's attention on the target
    assert torch.equal(mass[~cond.text_mask], torch.zeros_like(mass[~cond.text_mask]))
    assert ((mass[cond.text_mask] > 0) & (mass[cond.text_mask] < 1)).all()
    with policy.capture_attention(enabled=False) as none:
        policy.velocity(x, sigma, cond)
    assert none == []


@pytest.mark.parametrize("name", BACKBONES)
def test_reference_is_the_base_model_and_leaves_it_after_training(name):
    policy = BACKBONES[name]()
    base = copy.deepcopy(policy.transformer)
    module = SFTModule(policy, lora=LoraSettings(rank=4, alpha=8), lr=5e-2, warmup_steps=1)
    assert all(p.dtype == torch.float32 for n, p in policy.named_parameters() if "lora_" in n)
    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    sigma = torch.tensor([0.4, 0.6])
    with torch.no_grad():
        untouched = policy.velocity(x, sigma, cond)  # B = 0: the adapter adds nothing yet
    before = lora_params(module)
    quiet_fit(module, steps=2)
    assert unchanged(before, lora_params(module)) == []  # every LoRA weight trains
    with torch.no_grad():
        with policy.reference():
            reference = policy.velocity(x, sigma, cond)
        trained = policy.velocity(x, sigma, cond)
        policy.transformer, original = base, policy.transformer
        base_out = policy.velocity(x, sigma, cond)
        policy.transformer = original
    assert torch.allclose(untouched, base_out, atol=1e-6)
    assert torch.allclose(reference, base_out, atol=1e-6)
    assert (trained - reference).abs().max() > 1e-4


@pytest.mark.parametrize("name", BACKBONES)
def test_one_grpo_module_trains_every_lora_weight(name):
    policy = BACKBONES[name]()
    module = GRPOModule(
        policy,
        [Brightness()],
        lora=LoraSettings(rank=4, alpha=8),
        group_size=2,
        sample_steps=2,
        eval_steps=2,
        lr=1e-2,
        objective=FlowGRPO(kl_beta=0.01),  # the reference forward runs too
    )
    before = lora_params(module)
    trainer = quiet_fit(module, steps=2)
    assert trainer.callback_metrics["train/skipped"].item() == 0.0
    assert unchanged(before, lora_params(module)) == []
    assert not any(p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)


def tiny_rcgrpo(policy) -> RCGRPOModule:
    """RC-GRPO on a tiny backbone: the brightness and attention concentration rewards, LoRA
    rank 4, G = 2, 2 sampling and evaluation steps."""
    return RCGRPOModule(
        policy,
        [Brightness(), AttentionConcentrationReward()],
        lora=LoraSettings(rank=4, alpha=8),
        group_size=2,
        sample_steps=2,
        eval_steps=2,
        lr=1e-2,
    )


def test_rcgrpo_on_flux_uses_region_noise_and_the_attention_reward():
    policy = flux_policy()
    module = tiny_rcgrpo(policy)
    batch = scenes()
    record = module.sample(batch, torch.Generator().manual_seed(0))
    rows, cols = policy.token_grid((SIZE, SIZE))
    assert record.attention.shape == (4, policy.text.embedder.tokenizer.max_words, rows, cols)
    assert record.regions.shape == (4, *policy.latent_shape((SIZE, SIZE))[1:])
    scores = module.score(record, batch)
    assert torch.isfinite(scores.parts["attention_concentration"]).all()
    before = lora_params(module)
    quiet_fit(module, steps=2)
    assert unchanged(before, lora_params(module)) == []


@pytest.mark.parametrize("name", BACKBONES)
def test_shard_modules_are_the_transformer_blocks(name):
    policy = BACKBONES[name]()
    blocks = policy.shard_modules()
    assert len(blocks) == 2  # Flux: 1 joint + 1 single-stream block; Qwen: 2 blocks
    assert all(any(b is m for m in policy.transformer.modules()) for b in blocks)


@pytest.mark.parametrize("name", BACKBONES)
def test_gradient_checkpointing_is_the_policys_one_activation_checkpointing_switch(name):
    """`gradient_checkpointing` and `checkpoint_activations` are one switch, diffusers' own:
    no second wrapper goes on the blocks; the loss and gradient are those without it."""
    batch = scenes()
    results = []
    for on in (False, True):
        policy = BACKBONES[name](gradient_checkpointing=on)
        assert policy.checkpointing_activations == on == policy.transformer.gradient_checkpointing
        assert not any("forward" in vars(b) for b in policy.shard_modules())  # no wrapper
        policy.add_lora(LoraSettings(rank=2, alpha=2))
        cond = policy.encode_condition(batch["source"], batch["instruction"])
        shape = (2, *policy.latent_shape((SIZE, SIZE)))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        saved = []

        def pack(t, saved=saved):
            saved.append(1)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = policy.velocity(x, torch.tensor([0.3, 0.6]), cond).pow(2).mean()
        params = [p for p in policy.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # Qwen: dead LoRA weights
        results.append((loss.detach(), grads, len(saved)))
    policy.checkpoint_activations(False)
    assert not policy.checkpointing_activations and not policy.transformer.gradient_checkpointing
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert torch.equal(loss_a, loss_b)
    assert [a is None for a in grads_a] == [b is None for b in grads_b]
    pairs = [(a, b) for a, b in zip(grads_a, grads_b) if a is not None]
    assert pairs and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)
    assert saved_b < saved_a  # the blocks keep their inputs, not their activations


# --- no host synchronisation inside velocity -------------------------------------------------

SYNCS = ["item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__"]


class HostSync(Exception):
    pass


@pytest.fixture
def syncs_raise(monkeypatch):
    """Every Tensor method that copies a value to the host (a GPU sync) raises while active."""

    def refuse(*args, **kwargs):
        raise HostSync

    def arm():
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, refuse)

    return arm


@pytest.mark.parametrize("name", BACKBONES)
def test_velocity_forward_backward_and_capture_make_no_host_sync(name, syncs_raise):
    policy = BACKBONES[name]()
    policy.add_lora(LoraSettings(rank=2, alpha=2))
    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    sigma = torch.tensor([0.3, 0.6])
    syncs_raise()
    with pytest.raises(HostSync):  # the guard is live
        bool(sigma[0] > 0)
    policy.velocity(x, sigma, cond).pow(2).mean().backward()
    with torch.no_grad(), policy.capture_attention() as maps, policy.reference():
        policy.velocity(x, sigma, cond)
    assert len(maps) == 1
