"""The host sync diffusers' Qwen transformer makes for text lengths it discards, left out of
our calls (`lit_grpo.policies.qwen_text_length`): the same values, the same velocity."""

from contextlib import contextmanager

import pytest
import torch
from test_backbones import qwen_policy

import lit_grpo.policies.qwen_edit as qwen_edit
import lit_grpo.policies.qwen_text_length as qwen_text_length
from lit_grpo.policies.qwen_text_length import no_text_length_sync, text_length_and_mask


def test_the_replacement_returns_what_the_forward_reads_from_diffusers_own():
    from diffusers.models.transformers.transformer_qwenimage import (
        compute_text_seq_len_from_mask,
    )

    text = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])  # gaps, empty
    for m in (mask, mask.bool(), None):
        theirs, ours = compute_text_seq_len_from_mask(text, m), text_length_and_mask(text, m)
        assert ours[0] == theirs[0] == 5 and ours[1] is None
        assert (ours[2] is None) == (theirs[2] is None)
        if m is not None:
            assert ours[2].dtype == torch.bool and torch.equal(ours[2], theirs[2])
    with pytest.raises(ValueError, match="must match"):
        text_length_and_mask(text, mask[:, :4])


def test_the_swap_is_live_on_the_installed_diffusers_and_undone_after():
    from diffusers.models.transformers import transformer_qwenimage as module

    original = module.compute_text_seq_len_from_mask
    with no_text_length_sync() as swapped:
        assert swapped  # diffusers 0.42's forward discards the lengths: the swap applies
        assert module.compute_text_seq_len_from_mask is text_length_and_mask
    assert module.compute_text_seq_len_from_mask is original
    with pytest.raises(RuntimeError), no_text_length_sync():
        raise RuntimeError("a forward that fails")
    assert module.compute_text_seq_len_from_mask is original  # restored on an error too


def test_the_velocity_is_bit_for_bit_diffusers_own_on_padded_text(monkeypatch):
    policy = qwen_policy(true_cfg=2.0)
    images = torch.rand(2, 3, 16, 16)
    condition = policy.encode_condition(images, ["move the red circle to the left", "turn it"])
    assert not condition.text_mask.bool().all()  # one row padded: the mask path runs
    latents, sigma = torch.randn(2, policy.latent_channels, 4, 4), torch.tensor([0.7, 0.3])
    calls = []

    def counted(*args):
        calls.append(1)
        return text_length_and_mask(*args)

    monkeypatch.setattr(qwen_text_length, "text_length_and_mask", counted)
    with torch.no_grad():
        ours = policy.velocity(latents, sigma, condition)
    assert len(calls) == 2  # ours ran in both passes of true CFG

    @contextmanager
    def diffusers_own():
        yield False

    monkeypatch.setattr(qwen_edit, "no_text_length_sync", diffusers_own)
    with torch.no_grad():
        theirs = policy.velocity(latents, sigma, condition)
    assert torch.equal(ours, theirs)
