"""Exact-value tests of the SDE step, group advantages, the clipped loss and the KL term."""

import contextlib
import math

import pytest
import torch

from lit_grpo.objectives.flow_grpo import clipped_policy_loss, group_advantages, kl_to_reference
from lit_grpo.sampling.sde import sde_std, sde_step


def test_sde_step_by_hand():
    # sigma 0.5 -> 0.25, a = 1: std = sqrt(0.5 / 0.5) = 1, dt = -0.25
    x, v = torch.tensor([[2.0]]), torch.tensor([[4.0]])
    eps = torch.tensor([[0.5]])
    out = sde_step(x, v, torch.tensor(0.5), torch.tensor(0.25), 1.0, noise=eps)
    # mean = 2 * (1 + 1 / 1 * -0.25) + 4 * (1 + 1 * 0.5 / 1) * -0.25 = 1.5 - 1.5 = 0
    assert torch.allclose(out.mean, torch.tensor([[0.0]]))
    scale = math.sqrt(0.25)  # std * sqrt(-dt)
    assert torch.allclose(out.std, torch.tensor([scale]))
    assert torch.allclose(out.sample, torch.tensor([[0.0 + scale * 0.5]]))
    expected = -(0.5**2) / 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(out.log_prob, torch.tensor([expected]))


def test_sde_reductions_and_rescoring():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    s, s1 = torch.full((3,), 0.6), torch.full((3,), 0.4)
    full = sde_step(x, v, s, s1, 0.7, reduction="none", generator=torch.Generator().manual_seed(1))
    assert full.log_prob.shape == x.shape
    mean = sde_step(x, v, s, s1, 0.7, prev_sample=full.sample, reduction="mean")
    total = sde_step(x, v, s, s1, 0.7, prev_sample=full.sample, reduction="sum")
    assert torch.allclose(mean.log_prob, full.log_prob.flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(total.log_prob, full.log_prob.flatten(1).sum(1), atol=1e-4)
    # scoring the sample under the same velocity reproduces its log-probability
    again = sde_step(x, v, s, s1, 0.7, prev_sample=full.sample, reduction="none")
    assert torch.equal(again.log_prob, full.log_prob)
    with pytest.raises(ValueError, match="degenerate"):
        sde_step(x, v, s, torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        sde_step(x, v, s, s1, reduction="avg")


def test_sde_std_at_sigma_one_uses_sigma_max():
    std = sde_std(torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.4]), 1.0, torch.tensor(0.9))
    assert torch.allclose(std, torch.tensor([math.sqrt(1 / 0.1), 1.0]))


def test_sde_with_zero_noise_level_is_the_ode_step():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = sde_step(
        x, v, torch.tensor(0.8), torch.tensor(0.6), noise_level=1e-8, noise=torch.zeros(2, 3)
    )
    assert torch.allclose(out.sample, x - 0.2 * v, atol=1e-6)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])  # group 0 spread, group 1 zero spread
    g = group_advantages(r, 2, std="group")
    assert torch.allclose(g.values, torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0]), atol=1e-6)
    assert g.zero_spread.tolist() == [False, True]
    assert g.valid.tolist() == [True, True, False, False]
    glob = group_advantages(r, 2, std="global")
    pooled = r.std(unbiased=False).item()  # sqrt(0.5)
    assert torch.allclose(glob.values[:2], torch.tensor([-1.0, 1.0]) / (pooled + 1e-4), atol=1e-6)


def test_group_advantages_clamp_and_non_finite():
    r = torch.tensor([0.0, 0.0, 0.0, 1000.0, float("nan"), 1.0, 2.0, 3.0])
    g = group_advantages(r, 4, std="group", clamp=1.5)
    assert g.values.abs().max() <= 1.5 and g.values[3] == 1.5
    # the NaN rollout is dropped from its group's statistics and gets advantage 0
    assert not g.valid[4] and g.values[4] == 0
    assert torch.allclose(g.values[5:], torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4))
    assert not g.zero_spread.any()
    with pytest.raises(ValueError, match=r"\[B \* 3\]"):
        group_advantages(torch.zeros(4), 3)


def test_clipped_loss_by_hand():
    adv = torch.tensor([1.0, -1.0, 2.0])
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 1.5, 1.0]))  # ratios 1.5, 1.5, 1.0
    loss, stats = clipped_policy_loss(new, old, adv, clip_range=0.2)
    # max(-1*1.5, -1*1.2) = -1.2; max(1.5, 1.2) = 1.5; max(-2, -2) = -2  -> mean -1.7 / 3
    assert torch.allclose(loss, torch.tensor((-1.2 + 1.5 - 2.0) / 3))
    assert torch.allclose(stats.clip_fraction, torch.tensor(2 / 3))
    assert torch.allclose(stats.approx_kl, 0.5 * (new**2).mean())


def test_first_ratio_is_one_and_gradient_is_minus_advantage():
    logp = torch.tensor([0.3, -0.2], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, stats = clipped_policy_loss(logp, logp.detach(), adv, clip_range=2e-4)
    assert stats.ratio_mean.item() == 1.0 and stats.clip_fraction.item() == 0.0
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 2)


def test_weighted_loss_ignores_masked_items():
    adv = torch.tensor([1.0, 100.0])
    loss, _ = clipped_policy_loss(
        torch.zeros(2), torch.zeros(2), adv, 0.1, weights=torch.tensor([1.0, 0.0])
    )
    assert loss.item() == -1.0


def test_kl_to_reference_by_hand():
    mean = torch.tensor([[1.0, 3.0]])
    ref = torch.tensor([[0.0, 1.0]])
    kl = kl_to_reference(mean, ref, torch.tensor([2.0]))
    assert torch.allclose(kl, torch.tensor([(1 + 4) / 2 / (2 * 4)]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("std", ["group", "global"])
def test_a_non_finite_reward_leaves_its_groups_other_advantages_as_without_it(bad, std):
    clean = torch.tensor([0.3, -1.2, 0.7])  # one group of 3: what the group is without the row
    expected = group_advantages(clean, 3, std=std)
    r = torch.cat([clean[:1], torch.tensor([bad]), clean[1:]])  # the same group, one bad row
    got = group_advantages(r, 4, std=std)
    assert torch.equal(got.values[[0, 2, 3]], expected.values)  # exactly, not approximately
    assert got.values[1] == 0 and got.valid.tolist() == [True, False, True, True]
    # inf is dropped exactly like NaN: the same advantages, the same mask
    nan = group_advantages(torch.where(torch.isfinite(r), r, torch.nan), 4, std=std)
    assert torch.equal(got.values, nan.values) and torch.equal(got.valid, nan.valid)


def test_a_non_finite_reward_leaves_other_groups_alone_under_group_std():
    r = torch.tensor([0.1, 0.5, 0.9, 0.2, 1.0, 3.0, 2.0, 5.0])
    bad = r.clone()
    bad[2] = float("inf")
    clean, poisoned = group_advantages(r, 4, std="group"), group_advantages(bad, 4, std="group")
    assert torch.equal(poisoned.values[4:], clean.values[4:])
    assert torch.equal(
        poisoned.values[[0, 1, 3]], group_advantages(r[[0, 1, 3]], 3, "group").values
    )


class _Step:
    def __init__(self, mean, log_prob):
        self.mean, self.log_prob = mean, log_prob
        self.diffusion = torch.tensor([0.5, 0.5])


class _TwoMeans:
    """A sampler whose rescored step has means 1 and 3 (a row each, 2 elements), and whose
    reference (the adapter off) has means 0: no network needed."""

    def __init__(self):
        self.reference_on = False

    def rescore(self, policy, record, rows, k):
        mean = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
        return _Step(torch.zeros_like(mean) if self.reference_on else mean, torch.zeros(2, 2))


class _Policy:
    def __init__(self, sampler):
        self.sampler = sampler

    @contextlib.contextmanager
    def reference(self):
        self.sampler.reference_on = True
        yield
        self.sampler.reference_on = False


def test_flow_grpos_kl_term_by_hand():
    from types import SimpleNamespace

    from lit_grpo.objectives import FlowGRPO, LossInputs, PolicyTargets

    sampler = _TwoMeans()
    record = SimpleNamespace(log_prob_elements=torch.zeros(2, 1, 2))  # ratio 1: loss = -A
    targets = PolicyTargets(torch.tensor([1.0, -1.0]), torch.tensor([True, True]), 2.0)
    inputs = LossInputs(_Policy(sampler), sampler, record, targets, torch.arange(2), 0)
    loss, stats = FlowGRPO(kl_beta=0.1).loss(inputs)
    # per row: mean over elements of (mean - ref)^2 / (2 * 0.5^2) = 1 / 0.5 = 2 and 9 / 0.5 = 18;
    # summed over the valid rows on the denominator 2: (2 + 18) / 2 = 10
    assert stats.kl.item() == pytest.approx(10.0)
    # the clipped loss is (-1 + 1) / 2 = 0 at ratio 1; + 0.1 x 10
    assert loss.item() == pytest.approx(1.0)
    assert stats.loss.item() == pytest.approx(1.0) and stats.ratio.item() == 1.0
