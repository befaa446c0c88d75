"""SpatialFlow-GRPO: region scores, token advantages, the region-weighted loss, one step."""

import pytest
import torch
from helpers import shapeworld_batch, tiny_module
from torch import Tensor

from lit_grpo.modules import SpatialFlowGRPOModule
from lit_grpo.objectives import LossInputs
from lit_grpo.objectives.flow_grpo import kl_to_reference
from lit_grpo.objectives.spatialflow import region_mean, region_weighted_loss, token_credit
from lit_grpo.perception import ColourSegmenter
from lit_grpo.policies import TinyEditPolicy
from lit_grpo.rewards import RegionReward, Scorer, TranslationReward


def scenes(n=8):
    return shapeworld_batch(n, 32, ("translate",), "test", objects=(2, 3))


def tiny_spatialflow(**kw):
    """The tiny SpatialFlow-GRPO stage with the region reward of the translation reward."""
    return tiny_module([RegionReward([TranslationReward()])], cls=SpatialFlowGRPOModule, **kw)


def two_scenes():
    """Two training scenes of 2 or 3 objects (16 px)."""
    return shapeworld_batch(2, objects=(2, 3))


def test_region_weighted_loss_by_hand():
    # at ratio 1 each region's term is -A_r on every token it covers
    adv = torch.tensor([[-2.0, 1.0]])
    zero = torch.zeros(1, 4)
    cover = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    loss, stats = region_weighted_loss(zero, zero, adv, cover, torch.tensor([1.0, 3.0]), 0.1)
    # region means: 2 and -1; weights 1 and 3: (2 - 3) / 4
    assert loss.item() == -0.25
    assert stats.ratio_mean.item() == 1.0
    # a region absent from a row does not dilute it
    absent = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    loss, _ = region_weighted_loss(zero, zero, adv, absent, torch.tensor([1.0, 3.0]), 0.1)
    assert loss.item() == 2.0
    with pytest.raises(ValueError, match="do not match cover"):
        region_weighted_loss(zero, zero, torch.zeros(1, 3), cover, torch.ones(2), 0.1)
    with pytest.raises(ValueError, match=r"must be \[N, T\]"):
        region_weighted_loss(zero, torch.zeros(4), adv, cover, torch.ones(2), 0.1)


def test_straddling_tokens_take_each_regions_own_advantage_by_hand():
    # 3 tokens: edit covers [1, 1/2, 0], background [0, 1/2, 1]; ratios 1, 1.5, 0.5
    cover = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]])
    adv = torch.tensor([[1.0, -2.0]])  # edit +1, background -2
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5]])).requires_grad_()
    loss, stats = region_weighted_loss(new, old, adv, cover, torch.tensor([1.0, 3.0]), 0.2)
    # per term max(-A r, -A clamp(r, 0.8, 1.2)):
    # edit (A = +1): token 0: -1; token 1: max(-1.5, -1.2) = -1.2 (clipped)
    #   mean over its cover: (1 * -1 + 0.5 * -1.2) / 1.5 = -16 / 15
    # background (A = -2): token 1: max(3, 2.4) = 3; token 2: max(1, 1.6) = 1.6 (clipped)
    #   mean: (0.5 * 3 + 1 * 1.6) / 1.5 = 31 / 15
    # weights 1 and 3: (-16 / 15 + 3 * 31 / 15) / 4 = 77 / 60
    assert loss.item() == pytest.approx(77 / 60, rel=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(2 / 3)
    # d/d log-prob: -A r * cover / size * w / W on the unclipped terms, 0 on the clipped ones:
    # token 0: -1 * 1 / 1.5 / 4; token 1: background's 2 * 1.5 * 0.5 / 1.5 * 3 / 4; token 2: 0
    (grad,) = torch.autograd.grad(loss, new)
    assert torch.allclose(grad, torch.tensor([[-1 / 6, 0.75, 0.0]]), rtol=1e-6, atol=0)
    # the background at weight 0: the edit's term alone, -16 / 15, and no background push
    loss, _ = region_weighted_loss(new, old, adv, cover, torch.tensor([1.0, 0.0]), 0.2)
    (grad,) = torch.autograd.grad(loss, new)
    assert loss.item() == pytest.approx(-16 / 15, rel=1e-6)
    assert torch.allclose(grad, torch.tensor([[-2 / 3, 0.0, 0.0]]), rtol=1e-6, atol=0)


def test_token_credit_is_minus_the_loss_gradient_at_ratio_one():
    cover = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    adv = torch.tensor([[1.0, -2.0], [7.0, 0.5]])  # row 1 has no edit region
    weights = torch.tensor([1.0, 3.0])
    credit = token_credit(adv, cover, weights)
    # row 0: edit 1/4 * cover / 1.5 * (+1), background 3/4 * cover / 1.5 * (-2)
    # row 1: the background alone, 0.5 / 3 on each token
    expected = torch.tensor([[1 / 6, 1 / 12 - 1 / 2, -1.0], [1 / 6, 1 / 6, 1 / 6]])
    assert torch.allclose(credit, expected, rtol=1e-6, atol=1e-7)
    log_prob = torch.zeros(2, 3, requires_grad=True)
    loss, _ = region_weighted_loss(log_prob, torch.zeros(2, 3), adv, cover, weights, 0.1, None, 1)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert torch.allclose(-grad, credit, rtol=1e-6, atol=1e-7)


def edit_and_background(edit_px: tuple[slice, slice], size: int = 16) -> Tensor:
    """The cover [1, 3, T] of an edit region at `edit_px`, no other objects, and the
    background, on the tiny editor's 4x4-pixel tokens."""
    edit = torch.zeros(1, size, size)
    edit[(slice(None), *edit_px)] = 1
    masks = torch.stack([edit, torch.zeros_like(edit), 1 - edit], 1)  # edit, others, bg
    policy = TinyEditPolicy(width=32, depth=1, heads=2)
    return torch.stack([policy.pixel_to_tokens(masks[:, r]) for r in range(3)], 1)


ONLY_EDIT = torch.tensor([1.0, 0.0, 0.0])  # {edit: 1, others: 0, background: 0}


@pytest.mark.parametrize(
    "others, background",
    [(0.0, 2.0), (-3.0, -2.0), (1e30, -1e30), (float("inf"), float("nan")), (-5.0, 5.0)],
)
def test_zero_weight_regions_leave_loss_and_gradient_bit_identical(others, background):
    torch.manual_seed(0)
    cover = torch.cat([edit_and_background((slice(2, 11), slice(2, 11))) for _ in range(3)])
    cover[1] = edit_and_background((slice(5, 9), slice(1, 7)))[0]  # another edge layout
    old = torch.randn(3, 16)
    new = (old + 0.1 * torch.randn(3, 16)).requires_grad_()  # some ratios clip at 0.05
    edit_adv = torch.tensor([1.0, -0.7, 2.0])

    def loss_and_grad(others, background):
        adv = torch.stack(
            [edit_adv, torch.full((3,), others), torch.full((3,), background)], 1
        )  # [3, 3]
        loss, _ = region_weighted_loss(new, old, adv, cover, ONLY_EDIT, 0.05)
        return loss, torch.autograd.grad(loss, new)[0]

    loss, grad = loss_and_grad(0.0, 0.0)
    assert loss.isfinite() and grad.abs().sum() > 0
    other_loss, other_grad = loss_and_grad(others, background)
    assert torch.equal(other_loss, loss) and torch.equal(other_grad, grad)
    # where the edit region does not reach, no token is pushed
    assert torch.equal(grad[cover[:, 0] == 0], torch.zeros(int((cover[:, 0] == 0).sum())))


def test_issue_23_edit_region_no_longer_depends_on_the_background_advantage():
    # a 9x9-pixel edit region: 9 tokens, 8 of them partly background, 80% of its cover
    cover = edit_and_background((slice(2, 11), slice(2, 11)))
    edit_cover = cover[0, 0]
    partial = (edit_cover > 0) & (edit_cover < 1)
    assert int((edit_cover > 0).sum()) == 9 and int(partial.sum()) == 8
    assert (edit_cover[partial].sum() / edit_cover.sum()).item() == pytest.approx(65 / 81)
    zero = torch.zeros(1, 16)
    losses, grads = [], []
    for background in (0.0, 2.0, -2.0):  # the blended rule gave -0.649, -1.351, +0.053
        log_prob = zero.clone().requires_grad_()
        adv = torch.tensor([[1.0, 0.0, background]])
        loss, _ = region_weighted_loss(log_prob, zero, adv, cover, ONLY_EDIT, 0.1)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, log_prob)[0])
    assert [loss.item() for loss in losses] == [-1.0, -1.0, -1.0]  # -A_edit at ratio 1
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    # every edge token is pushed up, in proportion to the edit's cover of it
    assert torch.allclose(grads[0][0], -edit_cover / edit_cover.sum(), rtol=1e-6, atol=0)


def test_region_reward_on_exact_edits_partitions_and_scores_regions():
    batch = scenes()
    scorer = Scorer([RegionReward([TranslationReward()])], ColourSegmenter())
    perfect = scorer(batch["target"], batch).regions["regions"]
    masks = perfect.region_masks
    assert masks.shape == (8, 3, 32, 32)
    assert torch.equal(masks.sum(1), torch.ones(8, 32, 32))  # a partition
    assert (masks[:, 1].flatten(1).sum(1) > 0).all()  # every scene has another object
    edit, others, background = perfect.regions.unbind(1)
    assert torch.allclose(edit, torch.ones(8), atol=0.02)  # the true target: full edit score
    assert others.abs().max() < 0.02 and background.abs().max() < 1e-3  # nothing else moved
    # an edit that also shifts the other objects' colours pays in "others", not "background"
    smeared = batch["target"].clone()
    others_px = masks[:, 1:2].expand(-1, 3, -1, -1) > 0
    smeared[others_px] = (smeared[others_px] * 0.5).clamp(0, 1)
    hurt = scorer(smeared, batch).regions["regions"].regions
    assert (hurt[:, 1] < others - 0.05).all()
    assert torch.allclose(hurt[:, 2], background, atol=1e-3)


def test_the_true_targets_move_no_scene():
    """ShapeWorld's exact edits move the object alone: the scene's shift reads ~0 and the
    scene penalty takes nothing off the translation score."""
    batch = scenes()
    plain = Scorer([TranslationReward()], ColourSegmenter())(batch["target"], batch)
    relative = Scorer([TranslationReward(scene_penalty=10.0)], ColourSegmenter())
    scored = relative(batch["target"], batch)
    assert scored.parts["scene_shift"].abs().max() < 1e-3
    torch.testing.assert_close(scored.total, plain.total, atol=1e-2, rtol=0)


def test_spatialflow_targets_are_each_regions_group_advantages_and_cover():
    module, batch = tiny_spatialflow(), two_scenes()
    record = module.sample(batch, torch.Generator().manual_seed(0))
    scores = module.scorer(record.images, batch, 4)
    adv, targets = module.advantages(scores, record)
    assert targets.regions.shape == (8, 3) and targets.cover.shape == (8, 3, 16)
    assert torch.allclose(targets.cover.sum(1), torch.ones(8, 16))  # regions cover every token
    # each region's advantage is its scores normalised in their group (global std)
    region = scores.regions["regions"].regions
    for r in range(3):
        g = region[:, r].view(2, 4)
        expected = (g - g.mean(1, keepdim=True)) / (region[:, r].std(unbiased=False) + 1e-4)
        assert torch.allclose(targets.regions[:, r], expected.clamp(-5, 5).flatten(), rtol=1e-4)
    assert targets.regions.abs().sum() > 0


def kl_setup(**module_kwargs):
    """A tiny SpatialFlow module whose adapter is off the reference, one rollout batch of it,
    its targets and every row."""
    module, batch = tiny_spatialflow(**module_kwargs), two_scenes()
    for name, p in module.policy.named_parameters():  # move the adapter off the reference
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    record = module.sample(batch, torch.Generator().manual_seed(0))
    _, targets = module.advantages(module.scorer(record.images, batch, 4), record)
    rows = torch.arange(len(record))
    return module, LossInputs(module.policy, module.sampler, record, targets, rows, 0)


def test_spatialflow_kl_term_is_beta_times_the_reference_kl():
    module, inputs = kl_setup(kl_beta=0.5)
    record, targets, rows = inputs.record, inputs.targets, inputs.rows
    with_kl, stats = module.objective.loss(inputs)
    module.objective.kl_beta = 0.0
    without, _ = module.objective.loss(inputs)
    with torch.no_grad():
        step = module.sampler.rescore(module.policy, record, rows, 0)
        with module.policy.reference():
            ref = module.sampler.rescore(module.policy, record, rows, 0)
    kl = kl_to_reference(step.mean, ref.mean, step.diffusion)
    kl = (kl * targets.valid.float()).sum() / targets.denominator
    assert kl > 0
    assert stats.kl.item() == pytest.approx(kl.item(), rel=1e-5)
    # float32 sums: the difference of two losses carries their rounding, hence rel 1e-3
    assert (with_kl - without).item() == pytest.approx(0.5 * kl.item(), rel=1e-3)


def test_zero_weight_regions_give_the_adapter_the_same_gradient_through_the_module():
    from dataclasses import replace

    module, inputs = kl_setup(region_weights={"edit": 1.0, "others": 0.0, "background": 0.0})
    params = [p for p in module.policy.parameters() if p.requires_grad]

    def loss_and_grads(inputs):
        loss, _ = module.objective.loss(inputs)
        return loss, torch.autograd.grad(loss, params)

    loss, grads = loss_and_grads(inputs)
    assert loss != 0 and sum(g.abs().sum() for g in grads) > 0
    regions = inputs.targets.regions.clone()
    regions[:, 1:] = torch.randn(regions.shape[0], 2) * 100  # others' and background's
    moved = replace(inputs, targets=replace(inputs.targets, regions=regions))
    other_loss, other_grads = loss_and_grads(moved)
    assert torch.equal(other_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, other_grads, strict=True))
    # the edit's own advantage does move it
    regions[:, 0] = -regions[:, 0]
    assert not torch.equal(loss_and_grads(moved)[0], loss)


def test_region_mean_by_hand():
    per_token = torch.tensor([[2.0, 4.0, 6.0, 10.0]])
    cover = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0]]])
    # region means: 3 and (0.5 * 6 + 10) / 1.5 = 26 / 3; weights 0 and 1: the second alone
    assert region_mean(per_token, cover, torch.tensor([0.0, 1.0])).item() == pytest.approx(26 / 3)
    assert region_mean(per_token, cover, torch.tensor([1.0, 2.0])).item() == pytest.approx(
        (3 + 2 * 26 / 3) / 3
    )


def test_unmoved_edit_has_the_instructed_place_in_its_edit_region():
    # an edit that leaves the scene as it was: the object's old place is the only place it
    # is drawn, and the instructed place is background unless the target region is added
    batch = scenes()
    segmenter = ColourSegmenter()
    with_target = Scorer([RegionReward([TranslationReward()])], segmenter)
    without = Scorer([RegionReward([TranslationReward()], target=False)], segmenter)
    masks = with_target(batch["source"], batch).regions["regions"].region_masks
    old = without(batch["source"], batch).regions["regions"].region_masks
    # the instructed place: where the true edit draws the object, minus its old place
    true_edit = without(batch["target"], batch).regions["regions"].region_masks[:, 0] > 0
    new_place = true_edit & ~(old[:, 0] > 0)
    assert new_place.flatten(1).sum(1).min() > 0
    assert not (old[:, 0] > 0)[new_place].any()  # before: background or others
    assert (masks[:, 0] > 0)[new_place].float().mean() > 0.95  # now: the edit region
    assert torch.equal(masks.sum(1), torch.ones(8, 32, 32))  # still a partition
    assert with_target.rewards[0].move_fraction == 0.25  # the translation reward's


def test_region_kl_is_the_per_token_kl_over_the_chosen_regions():
    weights = {"others": 1.0, "background": 3.0}  # the edit region left out: weight 0
    module, inputs = kl_setup(kl_beta=2.0, kl_region_weights=weights)
    record, targets, rows = inputs.record, inputs.targets, inputs.rows
    _, stats = module.objective.loss(inputs)
    with torch.no_grad():
        step = module.sampler.rescore(module.policy, record, rows, 0)
        with module.policy.reference():
            ref = module.sampler.rescore(module.policy, record, rows, 0)
    # by hand: per element, per 4x4-pixel token (the tiny editor's latent is the image)
    sq = (step.mean - ref.mean) ** 2 / (2 * step.diffusion.view(-1, 1, 1, 1) ** 2)
    per_token = sq.mean(1).unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1)  # [8, 16]
    cover = targets.cover
    means = (cover * per_token[:, None]).sum(-1) / cover.sum(-1).clamp_min(1e-8)  # [8, 3]
    w = torch.tensor([0.0, 1.0, 3.0]) * (cover.sum(-1) > 0)
    expected = ((w * means).sum(1) / w.sum(1) * targets.valid).sum() / targets.denominator
    assert expected > 0
    assert stats.kl.item() == pytest.approx(expected.item(), rel=1e-5)
    # whole-image KL when no region weights are given
    module.objective.kl_region_weights = None
    _, whole = module.objective.loss(inputs)
    full = (sq.flatten(1).mean(1) * targets.valid).sum() / targets.denominator
    assert whole.kl.item() == pytest.approx(full.item(), rel=1e-5)
    module.objective.kl_region_weights = {"others": 1.0, "sky": 1.0}
    with pytest.raises(ValueError, match=r"kl_region_weights names \['sky'\]"):
        module.objective.loss(inputs)


def test_region_weights_are_checked_by_name_at_construction():
    policy = TinyEditPolicy(width=32, depth=1, heads=2)
    rewards = [RegionReward([TranslationReward()])]
    with pytest.raises(ValueError, match=r"region_weights names \['edits'\].*'edit', 'others'"):
        SpatialFlowGRPOModule(policy, rewards, region_weights={"edits": 1.0})
    with pytest.raises(ValueError, match="by name"):
        SpatialFlowGRPOModule(policy, rewards, region_weights=[1.0, 0.0, 0.0])
    module = SpatialFlowGRPOModule(policy, rewards, region_weights={"edit": 1.0})
    assert module.objective.weights(("edit", "others", "background")) == ([1.0, 0.0, 0.0], None)


def test_velocity_hold_by_hand():
    from lit_grpo.objectives.scene_hold import velocity_hold

    v = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])  # [1, 1, 2, 2]
    v_ref = torch.tensor([[[[0.0, 0.0], [0.0, 3.0]]]])
    per_token = velocity_hold(v, v_ref, lambda e: e.flatten(1))  # one element per token
    assert torch.equal(per_token, torch.tensor([[1.0, 4.0, 0.0, 9.0]]))
    # held: region 1 (tokens 2 and 3, cover 1 and 0.5); region 0 (tokens 0 and 1) not held
    cover = torch.tensor([[[1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.5]]])
    held = region_mean(per_token, cover, torch.tensor([0.0, 1.0]))
    assert held.item() == pytest.approx((1.0 * 0.0 + 0.5 * 9.0) / 1.5)


def test_hold_draws_levels_once_per_record_and_cover_the_schedule():
    from lit_grpo.objectives.scene_hold import HoldDraws

    class Record:
        latents = torch.zeros(3, 3, 4, 4)

        def __len__(self):
            return 3

    record, draws = Record(), HoldDraws()
    draws.prepare(record, 4, torch.Generator().manual_seed(0))
    first = (list(draws.fractions), draws.noise.clone())
    draws.prepare(record, 4, torch.Generator().manual_seed(1))  # same record: kept
    assert draws.fractions == first[0] and torch.equal(draws.noise, first[1])
    assert draws.noise.shape == (3, 4, 3, 4, 4)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert draws.fractions == expected.tolist()
    draws.fractions = [0.0, 0.0999, 0.5, 0.99999]
    assert [draws.level(k, 10) for k in range(4)] == [0, 0, 5, 9]


def test_scene_hold_is_zero_on_the_reference_and_beta_times_the_held_regions_velocity_gap():
    from lit_grpo.objectives.scene_hold import hold_state

    weights = {"others": 1.0, "background": 1.0}
    module, inputs = kl_setup(hold_beta=0.5, hold_region_weights=weights)
    objective = module.objective
    objective.epoch_rows(inputs.record, 1, "cpu", torch.Generator().manual_seed(3))
    with_hold, stats = objective.loss(inputs)
    objective.hold_beta = 0.0
    without, _ = objective.loss(inputs)
    # the hold by hand: term 0's level and noise, both velocities, the held regions' mean
    record, rows, policy, sampler = inputs.record, inputs.rows, module.policy, module.sampler
    level = objective._hold.level(0, sampler.steps)
    x_s, sigma = hold_state(
        record.latents, objective._hold.noise[:, 0], level, sampler.steps, sampler.shift
    )
    with torch.no_grad():
        v = policy.velocity(x_s, sigma, record.condition)
        with policy.reference():
            v_ref = policy.velocity(x_s, sigma, record.condition)
    per_token = policy.latent_to_tokens((v - v_ref) ** 2, tuple(record.images.shape[-2:]))
    held = region_mean(per_token, inputs.targets.cover[rows], torch.tensor([0.0, 1.0, 1.0]))
    expected = (held * inputs.targets.valid.float()).sum() / inputs.targets.denominator
    assert expected > 0
    assert stats.hold.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (with_hold - without).item() == pytest.approx(0.5 * expected.item(), rel=1e-3)
    # on the reference itself (LoRA B = 0, as training starts) the hold is exactly 0
    module, inputs = kl_setup(hold_beta=0.5, hold_region_weights=weights)
    for name, p in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
    _, stats = module.objective.loss(inputs)
    assert stats.hold.item() == 0.0


def test_scene_hold_settings_are_checked():
    from lit_grpo.objectives import SpatialFlowGRPO

    with pytest.raises(ValueError, match="needs the regions to hold"):
        SpatialFlowGRPO(hold_beta=1.0)
    with pytest.raises(ValueError, match="hold_beta must be >= 0"):
        SpatialFlowGRPO(hold_beta=-1.0, hold_region_weights={"background": 1.0})
    # the KL's regions are the default
    assert SpatialFlowGRPO(hold_beta=1.0, kl_region_weights={"others": 1.0}).hold_region_weights
    with pytest.raises(ValueError, match="hold_region_weights"):
        SpatialFlowGRPO(hold_beta=1.0, hold_region_weights={"backgrund": 1.0}).weights(
            ("edit", "others", "background")
        )
