"""RC-GRPO: region-decoupled noise, the edit region, the attention concentration reward,
Neighbor GRPO's objective, and both RC-GRPO modules training a tiny editor."""

import math

import pytest
import torch
from helpers import lora_params, moved, quiet_trainer, shapeworld_batch, tiny_data
from helpers import tiny_module as tiny_grpo_module

from lit_grpo.modules import NeighborRCGRPOModule, RCGRPOModule
from lit_grpo.objectives import LossInputs, NeighborGRPO, PolicyTargets
from lit_grpo.objectives.flow_grpo import group_advantages
from lit_grpo.objectives.neighbor import neighbor_log_probs, quasi_norm_advantages
from lit_grpo.perception import ColourSegmenter
from lit_grpo.perception.geometry import edit_region
from lit_grpo.rewards import (
    AttentionConcentrationReward,
    BackgroundReward,
    RewardInputs,
    TranslationReward,
)
from lit_grpo.sampling.noise import RegionDecoupledNoise
from lit_grpo.sampling.strategies import ODETrajectory

# --- region-decoupled noise -----------------------------------------------------------------


def test_region_decoupled_noise_is_the_formula_element_by_element():
    like = torch.empty(4, 2, 2, 2)  # 2 groups of 2
    m = torch.tensor([[1.0, 0.0], [0.0, 0.5]]).expand(4, 2, 2)  # in, out, out, soft
    x = RegionDecoupledNoise(perturbation=0.6).initial(like, 2, torch.Generator().manual_seed(0), m)
    gen = torch.Generator().manual_seed(0)  # the builder's draws, in its order
    shared = torch.randn(2, 2, 2, 2, generator=gen).repeat_interleave(2, 0)
    own = torch.randn(4, 2, 2, 2, generator=gen)
    s = 0.6 * m[:, None]
    assert torch.allclose(x, (1 - s**2).sqrt() * shared + s * own, atol=1e-7)
    # outside the region the group shares its draw exactly; inside, each rollout differs
    assert torch.equal(x[0, :, 0, 1], shared[0, :, 0, 1]) and torch.equal(
        x[0, :, 0, 1], x[1, :, 0, 1]
    )
    assert not torch.equal(x[0, :, 0, 0], x[1, :, 0, 0])
    assert not torch.equal(x[0, :, 0, 1], x[2, :, 0, 1])  # another group, another draw
    assert x[0, 0, 0, 0].item() == pytest.approx(0.8 * shared[0, 0, 0, 0] + 0.6 * own[0, 0, 0, 0])


def test_perturbation_one_draws_independent_noise_inside_and_sde_noise_is_masked_on_request():
    like = torch.empty(4, 1, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(4, 2, 2)
    gen = torch.Generator().manual_seed(1)
    x = RegionDecoupledNoise().initial(like, 4, gen, m)
    gen = torch.Generator().manual_seed(1)
    shared, own = torch.randn(1, 1, 2, 2, generator=gen), torch.randn(4, 1, 2, 2, generator=gen)
    assert torch.equal(x[:, :, 0, 0], own[:, :, 0, 0])  # inside: each its own draw
    assert torch.equal(x[:, :, 1, 1], shared[:, :, 1, 1].expand(4, 1))  # outside: shared
    plain = RegionDecoupledNoise().step(like, 4, 0, torch.Generator().manual_seed(2), m)
    assert not torch.equal(plain[0, :, 1, 1], plain[1, :, 1, 1])  # Flow-GRPO's, unmasked
    masked = RegionDecoupledNoise(mask_sde=True).step(
        like, 4, 0, torch.Generator().manual_seed(2), m
    )
    assert torch.equal(masked[0, :, 1, 1], masked[3, :, 1, 1])
    assert not torch.equal(masked[0, :, 0, 0], masked[1, :, 0, 0])
    with pytest.raises(ValueError, match="RCGRPOModule"):
        RegionDecoupledNoise().initial(like, 4)
    with pytest.raises(ValueError, match="perturbation"):
        RegionDecoupledNoise(perturbation=0.0)


# --- the edit region ----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["translate", "rotate", "scale"])
def test_edit_region_from_the_source_detection_covers_the_true_target(task):
    n = 120
    batch = shapeworld_batch(n, 32, (task,), "val", seed=3)
    before = ColourSegmenter()(batch["source"], batch["object"])  # what a reward sees
    region = edit_region(before, batch["task"], batch["direction"], batch["factor"], (32, 32))
    after = batch["mask_after"]
    covered = (region & after).sum((1, 2)) / after.sum((1, 2))
    assert (covered == 1).float().mean() >= 0.99, covered.min()
    assert region.float().mean() < 0.4  # a region, not the whole image
    assert (region & batch["mask_before"]).sum() == batch["mask_before"].sum()


# --- the attention concentration reward -----------------------------------------------------


def test_attention_concentration_is_the_share_of_the_instruction_mass_inside():
    attention = torch.zeros(2, 3, 2, 2)  # 2 rollouts, 3 tokens (the last one padding), 2 x 2
    attention[0, 0] = torch.tensor([[0.3, 0.1], [0.0, 0.0]])
    attention[0, 1] = torch.tensor([[0.1, 0.1], [0.2, 0.2]])
    attention[1, 0] = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    region = torch.tensor([[1.0, 0.5], [0.0, 0.0]]).expand(2, 2, 2)
    images = torch.zeros(2, 3, 8, 8)
    inputs = RewardInputs(
        images, images, ["a", "b"], None, None, None, attention=attention, attention_region=region
    )
    out = AttentionConcentrationReward()(inputs).scores
    assert out[0].item() == pytest.approx((0.3 + 0.05 + 0.1 + 0.05) / 1.0)
    assert out[1].item() == pytest.approx(1.0)
    attention[1] = 0
    assert math.isnan(AttentionConcentrationReward()(inputs).scores[1].item())  # no mass
    with pytest.raises(ValueError, match="RCGRPOModule"):
        AttentionConcentrationReward()(RewardInputs(images, images, ["a", "b"], *[None] * 4))


# --- Neighbor GRPO's pure functions ----------------------------------------------------------


def test_neighbor_log_probs_are_a_softmax_over_negative_mean_squared_distances():
    anchor = torch.zeros(1, 1, 2)
    candidates = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]]])  # d = 0, 1, 2
    got = neighbor_log_probs(anchor, candidates, temperature=1.0)
    z = math.log(1 + math.exp(-1) + math.exp(-2))
    assert torch.allclose(got, torch.tensor([[-z, -1 - z, -2 - z]]))
    half = neighbor_log_probs(anchor, candidates, temperature=0.5)  # d / tau = 0, 2, 4
    z = math.log(1 + math.exp(-2) + math.exp(-4))
    assert torch.allclose(half, torch.tensor([[-z, -2 - z, -4 - z]]))
    with pytest.raises(ValueError, match="candidates"):
        neighbor_log_probs(anchor, candidates[:, :, :, :1], 1.0)


def test_quasi_norm_advantages_hand_values_and_p2_is_the_group_z_score():
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    adv = quasi_norm_advantages(r, 4, p=1.0, eps=0.0)
    # c = -1.5, -0.5, 0.5, 1.5; ||c||_1 = 4; / sqrt(4) = 2
    assert adv.values[:4].tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert adv.zero_spread.tolist() == [False, True] and not adv.valid[4:].any()
    z = group_advantages(r, 4, std="group")
    assert torch.allclose(quasi_norm_advantages(r, 4, p=2.0).values, z.values)

    # against the z-score, p < 2 damps a group whose spread is everywhere more than one
    # where a rollout stands out: 0.5 / sqrt(2) vs 0.75 / (||c||_0.8 / 2)
    def damping(rewards):
        r = torch.tensor(rewards)
        q, z = quasi_norm_advantages(r, 4, p=0.8).values, group_advantages(r, 4, std="group")
        return (q.abs().max() / z.values.abs().max()).item()

    assert damping([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.5**0.5 / 2, rel=1e-3)
    assert damping([0.0, 1.0, 0.0, 1.0]) < damping([0.0, 0.0, 0.0, 1.0]) < 1
    # a NaN drops out: c = -1, 0, 1 over the 3 finite rollouts, ||c||_1 / sqrt(3) = 2 / sqrt(3)
    nan = quasi_norm_advantages(torch.tensor([float("nan"), 0.0, 1.0, 2.0]), 4, p=1.0, eps=0.0)
    h = math.sqrt(3) / 2
    assert torch.allclose(nan.values, torch.tensor([0.0, -h, 0.0, h])) and not nan.valid[0]


# --- the modules ------------------------------------------------------------------------------


def tiny_module(cls, **kw):
    """The tiny `cls` stage with the translation, background and attention rewards."""
    rewards = [TranslationReward(), BackgroundReward(), AttentionConcentrationReward()]
    return tiny_grpo_module(rewards, cls=cls, **kw)


def test_batch_regions_segment_each_batch_once():
    from lit_grpo.modules.regions import BatchRegions

    calls = []

    def segmenter(source, objects):
        calls.append(source)
        return ColourSegmenter()(source, objects)

    regions = BatchRegions(lambda before, b: before.mask)
    first, second = shapeworld_batch(), shapeworld_batch(3)
    before, region = regions(segmenter, first)
    again, same = regions(segmenter, first)
    assert len(calls) == 1 and again is before and same is region
    assert torch.equal(region, before.mask)
    _, other = regions(segmenter, second)  # a new batch: its own detections
    assert len(calls) == 2 and other.shape[0] == 3


def test_rc_module_samples_in_the_region_and_rewards_see_attention():
    module = tiny_module(RCGRPOModule)
    b = shapeworld_batch()
    record = module.sample(b, torch.Generator().manual_seed(0))
    assert record.regions.shape == (8, 16, 16) and record.attention.shape == (8, 16, 4, 4)
    _, region = module.regions(module.scorer.segmenter, b)
    assert torch.equal(record.regions[3], region[0].float())  # pixel space: latent = image
    scores = module.score(record, b)
    assert set(scores.parts) >= {"translation", "background", "attention_concentration"}
    share = scores.parts["attention_concentration"]
    assert ((share >= 0) & (share <= 1)).all()
    # the region-averaged log-prob: ratio exactly 1 on the recorded rollouts
    rows = torch.arange(8)
    targets = PolicyTargets(torch.zeros(8), torch.ones(8, dtype=torch.bool))
    inputs = LossInputs(module.policy, module.sampler, record, targets, rows, 0)
    new = module.objective.reduce(inputs.rescore().log_prob, inputs)
    old = module.objective.reduce(record.log_prob_elements[:, 0], inputs)
    assert torch.equal(new.detach(), old)
    m = record.regions[0]
    want = (record.log_prob_elements[0, 0] * m).sum() / (3 * m.sum())
    assert old[0].item() == pytest.approx(want.item(), rel=1e-5)


def test_neighbor_module_rolls_out_ode_and_its_first_ratio_is_one():
    module = tiny_module(NeighborRCGRPOModule, anchors=2, temperature=0.01)
    b = shapeworld_batch()
    record = module.sample(b, torch.Generator().manual_seed(0))
    assert record.log_prob_elements is None and record.num_trained_steps == 4
    # outside the region the group starts from one draw; inside, from its neighbours
    x0 = record.states[:, 0]
    outside = record.regions[0] == 0
    assert torch.equal(x0[0][:, outside], x0[3][:, outside])
    assert not torch.equal(x0[0], x0[1])
    rows = module.objective.epoch_rows(record, 1, "cpu")
    assert rows.numel() == 4 and set((rows // 4).tolist()) == {0, 1}  # 2 anchors a group
    targets = PolicyTargets(torch.randn(8), torch.ones(8, dtype=torch.bool), 8.0)
    loss, stats = module.objective.loss(
        LossInputs(module.policy, module.sampler, record, targets, rows, 1)
    )
    assert stats.ratio.item() == pytest.approx(1.0, abs=1e-4)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if "lora_" in n}
    # LoRA starts at B = 0: the loss reaches every B, and no A (its gradient is B^T (...) = 0)
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if "lora_A" in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert len(grads) == 12  # A and B of q, k, v, out, ff_in, ff_out


class _OneStepRecord:
    """A group of 3 one-dimensional rollouts, one ODE step from sigma 1 to 0.5."""

    group_size = 3
    states = torch.zeros(3, 1, 1, 1, 1)  # [N, K, C, h, w]: every rollout starts at 0
    next_states = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1, 1)  # where each landed
    sigmas, sigma_next = torch.tensor([1.0]), torch.tensor([0.5])
    condition = torch.zeros(3)


class _ConstantVelocity:
    latent_dtype = torch.float32

    def velocity(self, x, sigma, condition):
        return torch.full_like(x, -2.0)  # Euler: 0 + (0.5 - 1) * -2 = 1


def test_neighbor_loss_is_the_clipped_surrogate_over_each_anchors_group():
    """NeighborGRPO.loss by hand: anchor 0 of a group of 3 whose rollouts landed at 0, 1, 2.
    The policy's step now lands at 1; the recorded one at 0 (tau = 1)."""
    targets = PolicyTargets(torch.tensor([1.0, -1.0, 0.0]), torch.ones(3, dtype=torch.bool), 3.0)
    objective = NeighborGRPO(clip_range=0.2, anchors=1, temperature=1.0)
    record, rows = _OneStepRecord(), torch.tensor([0])
    loss, stats = objective.loss(LossInputs(_ConstantVelocity(), None, record, targets, rows, 0))
    e = math.exp
    old = [1 / (1 + e(-1) + e(-4)), e(-1) / (1 + e(-1) + e(-4))]  # distances 0, 1, 4
    new = [e(-1) / (1 + 2 * e(-1)), 1 / (1 + 2 * e(-1))]  # distances 1, 0, 1
    r0, r1 = new[0] / old[0], new[1] / old[1]  # 0.294 and 2.171: both outside 1 +- 0.2
    # A = +1: max(-r0, -clip(r0)) = -r0; A = -1: max(r1, clip(r1)) = r1; A = 0 adds 0.
    # Denominator: 3 valid rows x 1 anchor / G = 1 anchor
    assert loss.item() == pytest.approx(-r0 + r1, rel=1e-6)
    # candidate 2's ratio is e^-1 / Z_new over e^-4 / Z_old = 16: all three are clipped
    assert stats.clip_fraction.item() == 1.0


@pytest.mark.parametrize("cls", [RCGRPOModule, NeighborRCGRPOModule])
def test_both_paths_train_every_lora_parameter(cls):
    kw = {"strategy": ODETrajectory()} if cls is NeighborRCGRPOModule else {}
    module = tiny_module(cls, **kw)
    before = lora_params(module)
    trainer = quiet_trainer(max_steps=2, limit_train_batches=2, max_epochs=1)
    trainer.fit(module, tiny_data())
    assert len(moved(before, module)) == len(before)
    assert "reward/attention_concentration" in trainer.logged_metrics


def test_neighbor_module_refuses_a_kl_term():
    with pytest.raises(ValueError, match="kl_beta"):
        tiny_module(NeighborRCGRPOModule, kl_beta=0.1)
