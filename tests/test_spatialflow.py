"""SpatialFlow-GRPO: region scores, token advantages, the region-weighted loss, one step."""

import pytest
import torch
from helpers import shapeworld_batch, tiny_module

from lit_grpo.modules import SpatialFlowGRPOModule
from lit_grpo.objectives import LossInputs
from lit_grpo.objectives.flow_grpo import kl_to_reference
from lit_grpo.objectives.spatialflow import region_mean, region_weighted_loss, token_advantages
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


def test_token_advantages_by_hand():
    adv = torch.tensor([[1.0, -2.0]])  # two regions
    cover = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0]]])  # 4 tokens
    out = token_advantages(adv, cover)
    assert torch.equal(out, torch.tensor([[1.0, -0.5, -2.0, 0.0]]))  # last token: no region
    with pytest.raises(ValueError, match="do not match"):
        token_advantages(torch.zeros(1, 3), cover)


def test_region_weighted_loss_by_hand():
    # at ratio 1 the per-token loss is -A; regions average their tokens, rows their regions
    adv = torch.tensor([[1.0, 3.0, -2.0, 4.0]])
    zero = torch.zeros(1, 4)
    cover = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    loss, stats = region_weighted_loss(zero, zero, adv, cover, torch.tensor([1.0, 3.0]), 0.1)
    # region means: -(1 + 3) / 2 = -2 and -(-2 + 4) / 2 = -1; weights 1 and 3: (-2 - 3) / 4
    assert loss.item() == pytest.approx(-1.25)
    assert stats.ratio_mean.item() == 1.0
    # a region absent from a row does not dilute it
    absent = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    loss, _ = region_weighted_loss(zero, zero, adv, absent, torch.tensor([1.0, 3.0]), 0.1)
    assert loss.item() == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="one shape"):
        region_weighted_loss(zero, zero, torch.zeros(4), cover, torch.ones(2), 0.1)


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


def test_one_spatialflow_step_trains_the_lora_from_token_advantages():
    module, batch = tiny_spatialflow(), two_scenes()
    record = module.sample(batch, torch.Generator().manual_seed(0))
    scores = module.scorer(record.images, batch, 4)
    adv, targets = module.advantages(scores, record)
    assert targets.tokens.shape == (8, 16) and targets.cover.shape == (8, 3, 16)
    assert torch.allclose(targets.cover.sum(1), torch.ones(8, 16))  # regions cover every token
    assert targets.tokens.abs().sum() > 0
    # a token fully inside one region carries that region's group advantage
    region = scores.regions["regions"].regions
    g = region[:4, 2]  # background scores of the first group
    expected = (g - g.mean()) / (region[:, 2].std(unbiased=False) + 1e-4)
    inside = targets.cover[:4, 2] == 1
    row, tok = inside.nonzero()[0]
    assert targets.tokens[row, tok].item() == pytest.approx(
        expected[row].clamp(-5, 5).item(), rel=1e-4
    )


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
