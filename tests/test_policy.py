"""The embedded editor: shapes, token grid, LoRA, the reference view, weights files."""

import pytest
import torch

from lit_grpo.policies import LoraSettings, TinyEditPolicy, save_policy_weights
from lit_grpo.policies.weights import IncompatibleWeightsError

VOCAB = ["move", "the", "red", "square", "left", "right"]


def tiny(**kw):
    torch.manual_seed(0)
    return TinyEditPolicy(width=32, depth=2, heads=2, vocabulary=VOCAB, **kw)


def test_shapes_and_token_grid():
    policy = tiny(patch_size=4)
    src = torch.rand(3, 3, 16, 24)
    cond = policy.encode_condition(src, ["move the red square left"] * 3)
    assert cond.text.shape == (3, 16, 32) and cond.image.shape == (3, 3, 16, 24)
    x = policy.encode_images(torch.rand(3, 3, 16, 24))
    assert x.min() >= -1 and x.max() <= 1
    v = policy.velocity(torch.randn_like(x), torch.rand(3), cond)
    assert v.shape == x.shape
    assert policy.token_grid((16, 24)) == (4, 6)
    masks = torch.zeros(1, 16, 24, dtype=torch.bool)
    masks[0, :4, :8] = True  # exactly the first two tokens of row 0
    cover = policy.pixel_to_tokens(masks)
    assert cover.shape == (1, 24)
    assert cover[0, :2].tolist() == [1.0, 1.0] and cover[0, 2:].sum() == 0
    assert torch.equal(policy.decode(x), (x + 1) / 2)


def test_condition_repeat_interleave_is_group_layout():
    policy = tiny()
    cond = policy.encode_condition(torch.rand(2, 3, 8, 8), ["move left", "move right"])
    group = cond.repeat_interleave(3)
    assert group.image.shape[0] == 6
    assert torch.equal(group.text[1], cond.text[0]) and torch.equal(group.text[3], cond.text[1])


def test_velocity_depends_on_instruction_and_source():
    policy = tiny()
    for p in policy.parameters():  # break adaLN-Zero's zero output so outputs differ
        torch.nn.init.normal_(p, std=0.1)
    x, s = torch.randn(1, 3, 8, 8), torch.tensor([0.5])
    src = torch.rand(1, 3, 8, 8)
    v1 = policy.velocity(x, s, policy.encode_condition(src, ["move left"]))
    v2 = policy.velocity(x, s, policy.encode_condition(src, ["move right"]))
    v3 = policy.velocity(x, s, policy.encode_condition(torch.rand(1, 3, 8, 8), ["move left"]))
    assert not torch.allclose(v1, v2) and not torch.allclose(v1, v3)


def test_edit_keeps_the_source_outside_the_editable_mask():
    policy = tiny().eval()
    for p in policy.parameters():  # a policy whose edits differ from the source everywhere
        torch.nn.init.normal_(p, std=0.1)
    src = torch.rand(2, 3, 8, 8)
    words = ["move the red square left"] * 2
    editable = torch.zeros(2, 8, 8, dtype=torch.bool)
    editable[0, 2:5, 1:7] = True
    editable[1, :, :3] = True
    edit = lambda mask: policy.edit(  # noqa: E731
        src, words, 3, generator=torch.Generator().manual_seed(1), editable=mask
    )
    plain, blended = edit(None), edit(editable)
    keep = ~editable.unsqueeze(1).expand_as(src)
    assert torch.allclose(blended[keep], src[keep], atol=1e-6)  # [-1, 1] and back
    assert (plain[keep] - src[keep]).abs().min() > 1e-3
    assert not torch.allclose(blended[~keep], plain[~keep])  # denoised beside the source
    assert torch.equal(edit(torch.ones(2, 8, 8, dtype=torch.bool)), plain)
    with pytest.raises(ValueError, match="one \\[H, W\\] mask per source"):
        edit(editable[:, :4])


def test_bad_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        tiny().encode_images(torch.rand(1, 3, 10, 10))


def test_lora_trains_only_adapters_and_reference_is_base():
    policy = tiny()
    for p in policy.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    cond = policy.encode_condition(torch.rand(2, 3, 8, 8), ["move left"] * 2)
    base = policy.velocity(x, s, cond).detach()
    policy.add_lora(LoraSettings(rank=4, alpha=4))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B starts at zero: the adapted policy equals the base until it trains
    assert torch.allclose(policy.velocity(x, s, cond), base, atol=1e-6)
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    adapted = policy.velocity(x, s, cond)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with policy.reference():
        assert torch.allclose(policy.velocity(x, s, cond), base, atol=1e-6)
    assert torch.allclose(policy.velocity(x, s, cond), adapted)  # adapter back on


def test_reference_without_lora_is_an_error():
    with pytest.raises(RuntimeError, match="LoRA"):
        with tiny().reference():
            pass


def test_unknown_lora_target_names_the_layers():
    with pytest.raises(ValueError, match="to_q"):
        tiny().add_lora(LoraSettings(target_modules=["nonexistent"]))


def test_weights_round_trip_with_merged_lora(tmp_path):
    policy = tiny()
    policy.add_lora(LoraSettings(rank=4, alpha=8))
    for n, p in policy.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.3)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    src = torch.rand(2, 3, 8, 8)
    expected = policy.velocity(x, s, policy.encode_condition(src, ["move left"] * 2))
    path = save_policy_weights(policy, tmp_path / "p.safetensors")
    loaded = TinyEditPolicy(width=32, depth=2, heads=2, vocabulary=VOCAB, weights=str(path))
    got = loaded.velocity(x, s, loaded.encode_condition(src, ["move left"] * 2))
    assert torch.allclose(got, expected, atol=1e-5)


def test_writing_merged_weights_leaves_the_live_weights_bit_for_bit(tmp_path):
    """Every checkpoint merges the adapter to store a self-describing policy; peft's unmerge
    ((w + d) - d) used to leave the frozen weights a rounding error off, so a checkpoint
    changed the run that wrote it."""
    policy = tiny()
    policy.add_lora(LoraSettings(rank=4, alpha=8))
    for n, p in policy.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.3)
    x, s, src = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7]), torch.rand(2, 3, 8, 8)
    velocity = policy.velocity(x, s, policy.encode_condition(src, ["move left"] * 2))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    save_policy_weights(policy, tmp_path / "p.safetensors")
    after = policy.state_dict()
    assert [k for k, v in before.items() if not torch.equal(v, after[k])] == []
    again = policy.velocity(x, s, policy.encode_condition(src, ["move left"] * 2))
    assert torch.equal(again, velocity)  # the adapter is live again, not merged in twice


def test_missing_and_incompatible_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*weights: null"):
        tiny(weights=str(tmp_path / "nope.safetensors"))
    path = save_policy_weights(tiny(), tmp_path / "w32.safetensors")
    with pytest.raises(IncompatibleWeightsError, match="width: file 32 vs config 64"):
        TinyEditPolicy(width=64, depth=2, heads=2, vocabulary=VOCAB, weights=str(path))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IncompatibleWeightsError, match="could not read weights file"):
        tiny(weights=str(corrupt))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(IncompatibleWeightsError, match="could not read checkpoint"):
        tiny(weights=str(junk))
