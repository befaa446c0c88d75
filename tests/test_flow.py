"""Exact-value tests of the flow-matching convention and the SFT loss."""

import pytest
import torch

from lit_grpo.policies.base import Condition, EditPolicy
from lit_grpo.sampling import (
    SourceBlend,
    add_noise,
    ode_step,
    sample_ode,
    sample_sigmas,
    shortcut_to_data,
    sigma_schedule,
    velocity_target,
)


def test_sigma_schedule_plain_and_shifted():
    assert torch.allclose(sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift 3: 3 * 0.5 / (1 + 2 * 0.5) = 0.75; endpoints stay at 1 and 0
    s = sigma_schedule(2, shift=3.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.0]))
    with pytest.raises(ValueError, match="steps"):
        sigma_schedule(0)


def test_add_noise_and_target_by_hand():
    x0 = torch.tensor([[2.0, -1.0]])
    noise = torch.tensor([[0.0, 3.0]])
    xs = add_noise(x0, noise, torch.tensor([0.25]))
    assert torch.allclose(xs, torch.tensor([[1.5, 0.0]]))  # 0.75 * x0 + 0.25 * noise
    assert torch.allclose(velocity_target(x0, noise), torch.tensor([[-2.0, 4.0]]))


def test_ode_step_and_shortcut_recover_data_for_exact_velocity():
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    v = velocity_target(x0, noise)
    sigma = torch.tensor([0.8, 0.5, 0.3])
    xs = add_noise(x0, noise, sigma)
    assert torch.allclose(ode_step(xs, v, sigma, torch.zeros(3)), x0, atol=1e-6)
    assert torch.allclose(shortcut_to_data(xs, v, sigma), x0, atol=1e-6)
    # one step from 0.5 to 0.25 lands on the straight path
    step = ode_step(add_noise(x0, noise, torch.full((3,), 0.5)), v, 0.5, 0.25)
    assert torch.allclose(step, add_noise(x0, noise, torch.full((3,), 0.25)), atol=1e-6)


def test_sample_ode_with_straight_flow_reaches_the_data():
    x0 = torch.randn(2, 3, 4, 4)

    def velocity(x, sigma):  # the exact velocity of the straight path towards x0
        return (x - x0) / sigma.view(-1, 1, 1, 1)

    out = sample_ode(velocity, torch.randn(2, 3, 4, 4), steps=5)
    assert torch.allclose(out, x0, atol=1e-5)


def test_source_blend_by_hand():
    # two pixels, pixel 0 editable; steps 2: sigmas 1, 0.5, 0; the velocity is the mean of x,
    # so the kept background feeds the editable pixel's next step
    noise = torch.tensor([[2.0, 4.0]])
    source = torch.tensor([[10.0, 20.0]])
    blend = SourceBlend(source=source, editable=torch.tensor([[1.0, 0.0]]))
    velocity = lambda x, sigma: x.mean(1, keepdim=True).expand_as(x)  # noqa: E731
    # step 1: v = 3, x = [2, 4] - 0.5 * 3 = [0.5, 2.5]; pixel 1 <- 0.5 * 20 + 0.5 * 4 = 12
    # step 2: v = 6.25, x = [0.5, 12] - 0.5 * 6.25; pixel 1 <- the source, 20
    out = sample_ode(velocity, noise, steps=2, blend=blend)
    assert torch.equal(out, torch.tensor([[-2.625, 20.0]]))
    # unblended: v = 3 then 1.5, [0.5, 2.5] - 0.75
    assert torch.equal(sample_ode(velocity, noise, steps=2), torch.tensor([[-0.25, 1.75]]))


def test_source_blend_everywhere_or_nowhere():
    noise, source = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    velocity = lambda x, sigma: torch.tanh(x) + x.mean()  # noqa: E731
    plain = sample_ode(velocity, noise, steps=4, shift=3.0)
    ones = SourceBlend(source=source, editable=torch.ones(2, 1, 4, 4))
    zeros = SourceBlend(source=source, editable=torch.zeros(2, 1, 4, 4))
    assert torch.equal(sample_ode(velocity, noise, steps=4, shift=3.0, blend=ones), plain)
    assert torch.equal(sample_ode(velocity, noise, steps=4, shift=3.0, blend=zeros), source)


def test_sample_sigmas_kinds():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(1000, g, "logit_normal")
    assert s.min() > 0 and s.max() < 1 and abs(s.mean() - 0.5) < 0.03
    u = sample_sigmas(1000, g, "uniform")
    assert u.min() > 0 and u.max() < 1
    with pytest.raises(ValueError, match="unknown sigma sampling"):
        sample_sigmas(3, kind="beta")


class ConstantPolicy(EditPolicy):
    """Predicts a fixed velocity c; the loss is then ||c - (noise - x0)||^2 by hand."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.dummy = torch.nn.Linear(1, 1)

    denoiser = property(lambda self: self.dummy)

    def encode_images(self, images):
        return images * 2 - 1

    def decode(self, latents):
        return (latents + 1) / 2

    def encode_condition(self, images, instructions, keys=None):
        n = images.shape[0]
        return Condition(torch.zeros(n, 1, 1), torch.ones(n, 1, dtype=torch.bool), images)

    def velocity(self, latents, sigma, condition):
        return torch.full_like(latents, self.c)

    def latent_shape(self, image_size):
        return (3, *image_size)

    def token_grid(self, image_size):
        return image_size


def test_flow_matching_loss_on_hand_made_tensors():
    from lit_grpo.modules.sft import SFTModule

    module = SFTModule(ConstantPolicy(0.5))
    batch = {
        "source": torch.zeros(2, 3, 2, 2),
        "target": torch.full((2, 3, 2, 2), 0.75),  # x0 = 0.5
        "instruction": ["a", "b"],
    }
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    loss = module.flow_matching_loss(batch, gen, sigma=torch.tensor([0.3, 0.6]))
    expected = ((0.5 - (noise - 0.5)) ** 2).mean()
    assert torch.allclose(loss, expected)


def test_edit_region_weight_weighs_the_objects_positions_by_hand():
    """SFT's edit_region_weight (ours): sum(w * err) / sum(w), w = 4 on the object's pixels
    (mask before | after) and 1 elsewhere; 1 is the plain mean; no masks -> a clear error."""
    from lit_grpo.modules.sft import SFTModule

    batch = {
        "source": torch.zeros(2, 3, 2, 2),
        "target": torch.full((2, 3, 2, 2), 0.75),  # x0 = 0.5
        "instruction": ["a", "b"],
        "mask_before": torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool),
        "mask_after": torch.tensor([[[0, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool),
    }
    noise = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    err = (0.5 - (noise - 0.5)) ** 2  # [2, 3, 2, 2]
    w = torch.ones(2, 1, 2, 2)
    w[0, 0, 0, 0] = w[1, 0, 1, 1] = 4.0
    expected = (err * w).sum() / (w.expand_as(err).sum())  # 4 + 4 + 6 ones, x 3 channels
    sigma = torch.tensor([0.3, 0.6])
    module = SFTModule(ConstantPolicy(0.5), edit_region_weight=4.0)
    loss = module.flow_matching_loss(batch, torch.Generator().manual_seed(0), sigma=sigma)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, err.mean())
    plain = SFTModule(ConstantPolicy(0.5), edit_region_weight=1.0)
    loss = plain.flow_matching_loss(batch, torch.Generator().manual_seed(0), sigma=sigma)
    assert torch.allclose(loss, err.mean())
    del batch["mask_after"]
    with pytest.raises(ValueError, match="needs the edited object's masks.*mask_after"):
        module.flow_matching_loss(batch, torch.Generator().manual_seed(0), sigma=sigma)
    with pytest.raises(ValueError, match="edit_region_weight must be >= 1"):
        SFTModule(ConstantPolicy(0.5), edit_region_weight=0.5)
