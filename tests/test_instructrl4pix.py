"""InstructRL4Pix: the attention-map distance, the target region, DDPO's batch advantages, the
CLIP reward on a tiny random open_clip, and the module training a tiny editor."""

import json
import math

import pytest
import torch
import torchvision
from helpers import lora_params, moved, quiet_trainer, save_tiny_clip, shapeworld_batch, tiny_data
from helpers import tiny_module as tiny_grpo_module

from lit_grpo.modules import InstructRL4PixModule
from lit_grpo.objectives.ddpo import batch_advantages
from lit_grpo.objectives.flow_grpo import group_advantages
from lit_grpo.perception import ColourSegmenter, Detections
from lit_grpo.perception.geometry import target_region
from lit_grpo.policies import TinyEditPolicy
from lit_grpo.rewards import (
    AttentionConcentrationReward,
    AttentionMapReward,
    CLIPReward,
    RewardInputs,
    TranslationReward,
)
from lit_grpo.rewards.attention_distance import attention_map_distance
from lit_grpo.rewards.scoring import Scores

# --- the attention-map distance ---------------------------------------------------------------


def test_attention_map_distance_is_the_total_variation_of_the_object_map_by_hand():
    attention = torch.zeros(2, 3, 2, 2)  # 2 rollouts, 3 tokens, a 2 x 2 token grid
    attention[0, 0] = torch.tensor([[0.3, 0.1], [0.0, 0.0]])  # object word 1
    attention[0, 1] = torch.tensor([[0.1, 0.1], [0.2, 0.2]])  # object word 2
    attention[0, 2] = torch.tensor([[0.0, 0.0], [0.0, 0.9]])  # another word: not read
    attention[1, 1] = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    tokens = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    region = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    d = attention_map_distance(attention, tokens, region)
    # row 0: p = (0.4, 0.2, 0.2, 0.2), q = (0.5, 0.5, 0, 0): 1/2 (0.1 + 0.3 + 0.2 + 0.2)
    # row 1: p = q = (0, 0, 0, 1)
    assert torch.allclose(d, torch.tensor([0.4, 0.0]))
    # a half-covered token counts half: q = (2/3, 1/3, 0, 0)
    soft = torch.tensor([[1.0, 0.5], [0.0, 0.0]]).expand(2, 2, 2)
    d = attention_map_distance(attention, tokens, soft)
    assert d[0].item() == pytest.approx(0.5 * (4 / 15 + 2 / 15 + 0.2 + 0.2))
    assert d[1].item() == pytest.approx(1.0)  # all of it outside the region
    # no object token, or an empty region: cannot be scored
    none = attention_map_distance(attention, torch.zeros(2, 3), region)
    empty = attention_map_distance(attention, tokens, torch.zeros(2, 2, 2))
    assert none.isnan().all() and empty.isnan().all()
    with pytest.raises(ValueError, match="tokens"):
        attention_map_distance(attention, tokens[:, :2], region)
    with pytest.raises(ValueError, match="region"):
        attention_map_distance(attention, tokens, region[:, :1])


def _inputs(attention, tokens, region):
    images = torch.zeros(attention.shape[0], 3, 8, 8)
    return RewardInputs(
        images,
        images,
        ["a"] * attention.shape[0],
        None,
        None,
        None,
        attention=attention,
        attention_region=region,
        attention_tokens=tokens,
    )


def test_attention_map_reward_pays_for_covering_the_region_not_only_for_being_in_it():
    region = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).expand(2, 2, 2)
    attention = torch.zeros(2, 1, 2, 2)
    attention[0, 0, 0, 0] = 1.0  # all on one token of the region
    attention[1, 0, 0] = 0.5  # spread over the region
    inputs = _inputs(attention, torch.ones(2, 1), region)
    overlap = AttentionMapReward()(inputs).scores
    assert overlap.tolist() == [0.5, 1.0]  # 1 - total variation
    # RC-GRPO's concentration cannot tell them apart: both put all their mass inside
    assert AttentionConcentrationReward()(inputs).scores.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="InstructRL4PixModule"):
        AttentionMapReward()(_inputs(attention, None, region))


# --- the target region ------------------------------------------------------------------------


def _detections(mask: torch.Tensor) -> Detections:
    n = mask.shape[0]
    ys, xs = torch.meshgrid(torch.arange(8.0) + 0.5, torch.arange(8.0) + 0.5, indexing="ij")
    m = mask.float()
    area = m.sum((1, 2))
    centre = torch.stack([(m * xs).sum((1, 2)) / area, (m * ys).sum((1, 2)) / area], 1)
    zeros = torch.zeros(n)
    return Detections(torch.ones(n, dtype=torch.bool), mask, torch.zeros(n, 4), centre, zeros, area)


def test_target_region_moves_turns_and_grows_the_source_mask_by_hand():
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, 3:5, 3:5] = True  # a 2 x 2 block centred at (4, 4)
    mask[:2, 2, 3] = True  # rows 0-1: a pixel above its left half
    mask[:2, 5, 4] = True  # and one below its right half: the centre stays at (4, 4)
    before = _detections(mask)
    assert before.centre.tolist() == [[4.0, 4.0]] * 3
    region = target_region(
        before,
        ["translate", "rotate", "scale"],
        torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
        torch.tensor([0.0, 90.0, 0.0]),
        torch.tensor([1.0, 1.0, 2.0]),
        (8, 8),
        move_fraction=0.25,  # 2 px of 8
    )
    want = torch.zeros(3, 8, 8, dtype=torch.bool)
    want[0, 3:5, 5:7] = want[0, 2, 5] = want[0, 5, 6] = True  # the same shape, 2 px right
    # a quarter turn ccw as seen: the pixel above goes to the left, the one below to the right
    want[1, 3:5, 3:5] = want[1, 4, 2] = want[1, 3, 5] = True
    want[2, 2:6, 2:6] = True  # the block at twice the size about its centre
    assert torch.equal(region, want), region.int()
    # not found: nothing says where the object should be
    before.found[0] = False
    region = target_region(
        before, ["translate"] * 3, torch.zeros(3, 2), torch.zeros(3), torch.ones(3), (8, 8)
    )
    assert not region[0].any() and torch.equal(region[1], mask[1])  # a zero move stays put


@pytest.mark.parametrize("task,iou", [("translate", 0.95), ("rotate", 0.7), ("scale", 0.75)])
def test_target_region_matches_where_the_object_really_ends_up(task, iou):
    n = 40
    batch = shapeworld_batch(n, 32, (task,), "val", seed=3)
    seg = ColourSegmenter()
    before = seg(batch["source"], batch["object"])  # what a reward sees: no ground truth

    after = seg(batch["target"], batch["object"]).mask  # where the object really is

    def iou_with_after(region):
        return ((region & after).sum((1, 2)) / (region | after).sum((1, 2))).mean().item()

    def overlap(angle_sign):
        direction, angle, factor = batch["direction"], angle_sign * batch["angle"], batch["factor"]
        return iou_with_after(
            target_region(before, batch["task"], direction, angle, factor, (32, 32))
        )

    assert overlap(1.0) > iou
    assert overlap(1.0) > iou_with_after(before.mask) + 0.1  # better than not moving it
    if task == "rotate":  # the sign convention: the other way turns it wrong
        assert overlap(-1.0) < overlap(1.0) - 0.1


# --- DDPO's batch advantages ------------------------------------------------------------------


def test_batch_advantages_use_the_batch_mean_and_std_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    adv = batch_advantages(r, 4, eps=0.0)
    mean = 26 / 8
    std = math.sqrt(sum((x - mean) ** 2 for x in r.tolist()) / 8)
    assert torch.allclose(adv.values, (r - mean) / std)
    # the tied group still learns: it is above the batch mean (GRPO would skip it)
    assert adv.valid.all() and not adv.zero_spread.any() and (adv.values[4:] > 0).all()
    assert group_advantages(r, 4).zero_spread.tolist() == [False, True]
    # a non-finite reward drops out of the statistics; a flat batch has nothing to learn
    nan = batch_advantages(torch.tensor([float("nan"), 0.0, 2.0, 4.0]), 2, eps=0.0)
    assert torch.allclose(nan.values, torch.tensor([0.0, -(1.5**0.5), 0.0, 1.5**0.5]))
    assert nan.valid.tolist() == [False, True, True, True]
    flat = batch_advantages(torch.ones(4), 2)
    assert flat.zero_spread.all() and not flat.valid.any() and not flat.values.any()
    assert batch_advantages(torch.tensor([0.0, 100.0]), 2, clamp=0.5).values.tolist() == [
        -0.5,
        0.5,
    ]


# --- the CLIP reward --------------------------------------------------------------------------


@pytest.fixture
def tiny_clip(tmp_path):
    """A random 1.7M-parameter open_clip model written to local files: (config, weights)."""
    config, weights, _ = save_tiny_clip(tmp_path)
    return config, weights


def test_clip_reward_is_the_cosine_of_open_clips_embeddings(tiny_clip, tmp_path):
    import open_clip

    config, weights = tiny_clip
    with pytest.raises(FileNotFoundError, match="no_clip.bin"):
        CLIPReward(config, str(tmp_path / "no_clip.bin"))
    reward = CLIPReward(config, weights, weight=0.5)
    assert reward.state_dict() == {} and not list(reward.parameters())  # held outside
    batch = shapeworld_batch(6, 32, ("translate", "rotate", "scale"), "test")
    inputs = RewardInputs(batch["target"], batch["source"], batch["instruction"], *[None] * 3)
    scores = reward(inputs).scores
    assert scores.shape == (6,) and ((scores >= -1) & (scores <= 1)).all()
    assert not scores.requires_grad
    # by hand: the same weights, open_clip's normalisation (the images are already 32 px)
    net = open_clip.CLIP(**json.loads(open(config).read()))
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    with torch.no_grad():
        normalise = torchvision.transforms.Normalize(
            open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        )
        image = net.encode_image(normalise(batch["target"]), normalize=True)
        text = net.encode_text(open_clip.tokenize(batch["instruction"]), normalize=True)
    assert torch.allclose(scores, (image * text).sum(-1), atol=1e-5)
    # another instruction, another score: the text is read
    swapped = RewardInputs(
        batch["target"], batch["source"], list(reversed(batch["instruction"])), *[None] * 3
    )
    assert not torch.allclose(reward(swapped).scores, scores)


# --- the module -------------------------------------------------------------------------------


def tiny_module(**kw):
    """The tiny InstructRL4Pix stage with the attention-map and translation rewards."""
    rewards = [AttentionMapReward(), TranslationReward()]
    return tiny_grpo_module(rewards, cls=InstructRL4PixModule, **kw)


def test_policy_finds_the_object_words_of_an_instruction():
    policy = TinyEditPolicy(width=32, depth=1, heads=2)
    tokens = policy.phrase_tokens(
        ["move the red triangle to the left", "turn the blue square", "move it"],
        ["red triangle", "blue square", "red triangle"],
    )
    assert tokens.shape == (3, 16)
    assert tokens[0].nonzero().flatten().tolist() == [2, 3]
    assert tokens[1].nonzero().flatten().tolist() == [2, 3]
    assert not tokens[2].any()


def test_module_hands_the_rewards_object_attention_and_target_region():
    module = tiny_module()
    b = shapeworld_batch()
    record = module.sample(b, torch.Generator().manual_seed(0))
    inputs = module.observe(record.images, b, 4, record.attention)
    assert inputs.attention.shape == (8, 16, 4, 4)
    object_words = module.policy.phrase_tokens(b["instruction"], b["object"]).float()
    assert torch.equal(inputs.attention_tokens, object_words.repeat_interleave(4, 0))
    _, region = module.regions(module.scorer.segmenter, b)
    cover = module.policy.pixel_to_tokens(region).view(2, 4, 4)
    assert torch.equal(inputs.attention_region[4], cover[1]) and cover.sum() > 0
    scores = module.score(record, b)
    overlap = scores.parts["attention_map"]
    assert ((overlap >= 0) & (overlap <= 1)).all()
    want = 1 - attention_map_distance(
        record.attention, inputs.attention_tokens, inputs.attention_region
    )
    assert torch.allclose(overlap, want)
    # the advantages: DDPO's batch statistics of the total, not the groups'
    total = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0])
    adv, targets = module.advantages(Scores(total, {}, {}), record)
    assert torch.allclose(targets.advantages, batch_advantages(total, 4).values)
    assert targets.valid.all() and targets.advantages[:4].lt(0).all()
    bad = dict(b, object=["green circle", b["object"][1]])
    bad["source"] = b["source"].clone()
    with pytest.raises(ValueError, match="green circle"):
        module.observe(record.images, bad, 4, record.attention)
    with pytest.raises(ValueError, match="adv_std"):
        tiny_module(adv_std="group")


def test_module_trains_every_lora_parameter():
    module = tiny_module()
    before = lora_params(module)
    trainer = quiet_trainer(max_steps=2, limit_train_batches=2, max_epochs=1)
    trainer.fit(module, tiny_data())
    assert len(moved(before, module)) == len(before)
    assert "reward/attention_map" in trainer.logged_metrics
