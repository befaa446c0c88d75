"""SamClipSegmenter as a SceneSegmenter: the scene rules by hand (`perception.scene`), the
objects of photo-like images with a tiny random SAM, a RegionReward scoring a real-image
batch through them, and orientation read from SamClip detections."""

from dataclasses import fields

import pytest
import torch
from helpers import tiny_clip_scorer, tiny_sam, toy_photo
from test_jsonl_data import save_png, write_jsonl
from test_text_segmenter import AreaScorer, scene_image

from lit_grpo.datamodules.jsonl import JsonlEditDataset, collate_rows
from lit_grpo.datamodules.shapeworld import Shape
from lit_grpo.perception import Detections, SamClipSegmenter, SceneSegmenter
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.scene import distinct_objects, sides_touched, stability_score
from lit_grpo.rewards import RegionReward, TranslationReward
from lit_grpo.rewards.scoring import Scorer

LOOSE = {  # the tiny random SAM rates nothing highly: thresholds that let its masks through
    "points_per_side": 4,
    "min_quality": -10,
    "min_area": 0.01,
    "max_area": 0.5,
    "scene_quality": -10,
    "scene_stability": 0.0,
    "scene_max_sides": 3,
}


def rows(det: Detections, which: slice) -> Detections:
    return Detections(**{f.name: getattr(det, f.name)[which] for f in fields(det)})


def block(y0, y1, x0, x1, size=16):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_stability_score_is_the_iou_of_the_masks_at_the_two_cuts():
    logits = torch.tensor(
        [
            [[2.0, 0.5], [-0.5, -2.0]],  # 1 px above +1, 3 px above -1
            [[3.0, 3.0], [3.0, 3.0]],  # a sharp mask
            [[-3.0, -3.0], [-3.0, -3.0]],  # nothing at either cut
        ]
    )
    assert torch.equal(stability_score(logits, 0.0, 1.0), torch.tensor([1 / 3, 1.0, 0.0]))
    # cuts at 1.5 and -0.5 (strict): 1 px and 2 px
    assert torch.equal(stability_score(logits, 0.5, 1.0), torch.tensor([1 / 2, 1.0, 0.0]))


def test_scene_rules_drop_the_backdrop_duplicates_and_parts_by_hand():
    a = block(3, 13, 3, 13)  # 100 px, inside the frame: an object
    masks = torch.stack(
        [
            block(5, 8, 5, 8),  # 0: a part of a, 9 px all inside it
            a,  # 1
            block(4, 13, 3, 13),  # 2: a near-duplicate of a, 90 px inside it
            block(0, 2, 0, 2),  # 3: a small object in the corner (2 sides)
            block(0, 16, 0, 10),  # 4: 160 px = 0.625 of the image: the backdrop
            block(14, 16, 0, 16),  # 5: a strip along the bottom (3 sides): floor or table
            block(10, 14, 10, 14),  # 6: 16 px, 9 inside a (56 %): another object
            a & ~block(3, 4, 3, 4) | block(2, 3, 3, 4),  # 7: 100 px, 99 inside a (99 %)
        ]
    )
    assert sides_touched(masks).tolist() == [0, 0, 0, 2, 3, 3, 0, 0]
    kept = distinct_objects(masks, max_area=0.5, max_sides=2, contain=0.9)
    assert kept.tolist() == [1, 6, 3]  # largest first; a tie keeps the first (1 before 7)
    # the limits are inclusive and each rule can be opened up
    assert distinct_objects(masks, 0.625, 3, 0.9).tolist() == [4, 1, 5, 6]  # 3 inside 4
    assert distinct_objects(masks, 0.5, 2, 1.01).tolist() == [1, 7, 2, 6, 0, 3]
    assert distinct_objects(masks[:0], 0.5, 2, 0.9).tolist() == []


def test_objects_are_the_union_of_the_scene_which_the_rules_decide(monkeypatch):
    seg = SamClipSegmenter.from_models(tiny_sam(), AreaScorer(), scene_max_area=0.5)
    assert isinstance(seg, SceneSegmenter)
    a = block(3, 13, 3, 13)
    proposals = torch.stack([block(5, 8, 5, 8), a, block(14, 16, 0, 16), block(0, 2, 0, 2)])
    asked = []

    def propose(image, min_quality=None, min_stability=0.0, max_area=None):
        asked.append((min_quality, min_stability, max_area))
        return proposals, torch.ones(4)

    monkeypatch.setattr(seg, "propose", propose)
    images = torch.rand(2, 3, 16, 16)
    scene = seg.scene(images[0])
    assert torch.equal(scene, proposals[[1, 3]])
    assert asked == [(0.88, 0.95, 0.5)]  # SAM's generator's quality rules, our size limit
    objects = seg.objects(images)
    assert objects.shape == (2, 16, 16) and objects.dtype == torch.bool
    assert torch.equal(objects, (a | block(0, 2, 0, 2)).expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        seg.objects(images[0])
    with pytest.raises(ValueError, match="min_area < scene_max_area"):
        SamClipSegmenter.from_models(tiny_sam(), AreaScorer(), min_area=0.2, scene_max_area=0.1)


def test_objects_of_photos_with_a_tiny_sam_are_distinct_proposals():
    seg = SamClipSegmenter.from_models(tiny_sam(), AreaScorer(), **LOOSE)
    images = torch.stack([toy_photo(48, 48, seed) for seed in (0, 1)])
    objects = seg.objects(images)
    for i in range(2):
        scene = seg.scene(images[i])
        proposals, _ = seg.propose(images[i], -10, 0.0, 0.5)
        assert 2 <= scene.shape[0] < proposals.shape[0]  # measured: 4 and 2 of 24
        assert torch.equal(objects[i], scene.any(0))
        flat = scene.flatten(1)
        pixels = flat.sum(1)
        assert (pixels[:-1] >= pixels[1:]).all() and (pixels <= 0.5 * 48 * 48).all()
        assert (sides_touched(scene) <= 3).all()
        for k in range(1, scene.shape[0]):  # none mostly inside the larger ones: no duplicates
            assert (flat[k] & flat[:k].any(0)).sum() < 0.9 * pixels[k]
        for mask in scene:  # each is one of SAM's proposals
            assert any(torch.equal(mask, p) for p in proposals)
    # SAM's own quality rules (0.88, 0.95) keep nothing of a random SAM: no object, no error
    strict = SamClipSegmenter.from_models(tiny_sam(), AreaScorer(), points_per_side=4)
    assert not strict.objects(images).any()


def test_region_reward_scores_a_photo_batch_through_the_scene_and_partitions_it(tmp_path):
    rows = []
    for i, seed in enumerate((0, 3)):  # photos whose scene has objects besides the target
        save_png(tmp_path / f"photos/{i}.png", toy_photo(40, 48, seed))
        rows.append(
            {
                "image": f"photos/{i}.png",
                "instruction": "move the cup to the left",
                "task": "translate",
                "object": "cup",
            }
        )
    data = JsonlEditDataset(write_jsonl(tmp_path / "rows.jsonl", rows), (40, 48))
    batch = collate_rows([data[0], data[1]])
    seg = SamClipSegmenter.from_models(tiny_sam(), tiny_clip_scorer(), threshold=-1.0, **LOOSE)
    scorer = Scorer([RegionReward([TranslationReward()])], seg)
    # 2 rollouts per source: the source unchanged, and shifted 6 px right
    edits = torch.stack([batch["source"], batch["source"].roll(6, -1)], 1).flatten(0, 1)
    out = scorer(edits, batch, repeats=2).regions["regions"]
    masks = out.region_masks
    assert masks.shape == (4, 3, 40, 48)
    assert torch.equal(masks.sum(1), torch.ones(4, 40, 48))  # the three regions partition
    edit, others = masks[:, 0] > 0, masks[:, 1] > 0
    before = seg(batch["source"], batch["object"]).repeat_interleave(2)
    assert before.found.all()
    # "others" is the scene's objects (grown by dilate 1) less the edit region, which holds
    # the target: no target pixel is another object
    objects = seg.objects(batch["source"]).repeat_interleave(2, 0)
    assert torch.equal(others, ~geo.outside_mask([objects], 1) & ~edit)
    assert not (others & before.mask).any() and (others.flatten(1).sum(1) > 0).all()
    l1 = geo.background_l1(batch["source"].repeat_interleave(2, 0), edits, others)
    assert torch.equal(out.regions[:, 1], -l1)
    assert out.regions[0::2, 1].eq(0).all() and (out.regions[1::2, 1] < 0).all()


def test_orientation_of_samclip_detections_goes_through_the_estimator(monkeypatch):
    """SamClip's detections get their headings from the OrientationEstimator: a triangle
    turned by 90 degrees reads as a 90-degree turn."""
    seg = SamClipSegmenter.from_models(tiny_sam(), AreaScorer(), threshold=0.0)
    images, masks = [], []
    for angle in (30.0, 120.0):
        image, cov = scene_image(
            [Shape("triangle", "red", 24, 22, 24, angle), Shape("square", "blue", 6, 6, 5, 0.0)],
            48,
        )
        images.append(image)
        masks.append(cov)
    proposals = iter(masks)
    monkeypatch.setattr(seg, "propose", lambda image: (next(proposals), torch.ones(2)))
    det = seg(torch.stack(images), ["red triangle"] * 2)
    assert det.found.all()
    assert torch.equal(det.mask, torch.stack([m[0] for m in masks]))  # the larger mask won
    assert (det.angle - torch.tensor([30.0, 120.0])).abs().max() < 1.5
    before, after = rows(det, slice(0, 1)), rows(det, slice(1, 2))
    assert geo.rotation_error(before, after, torch.tensor([90.0])).item() < 1.0


def test_locate_runs_sam_once_for_every_phrase_of_an_image():
    class PhraseScorer:  # the mask's pixel share, plus a bonus per phrase
        def __call__(self, image, masks, phrase):
            return masks.flatten(1).float().mean(1) + {"cup": 1.0, "dog": -1.0}[phrase]

    seg = SamClipSegmenter.from_models(tiny_sam(), PhraseScorer(), threshold=0.5, **LOOSE)
    image = toy_photo(48, 48, 0)
    calls = []
    propose = seg.propose
    seg.propose = lambda *a: calls.append(a) or propose(*a)
    det, best = seg.locate(image, ["cup", "dog"])
    assert len(calls) == 1 and det.found.tolist() == [True, False]
    proposals, _ = propose(image)
    share = proposals.flatten(1).float().mean(1)
    assert torch.equal(det.mask[0], proposals[share.argmax()]) and not det.mask[1].any()
    assert best.tolist() == pytest.approx([share.max().item() + 1, share.max().item() - 1])
    alone = seg(image[None], ["cup"])  # the same detection as the batched call's
    for f in fields(det):
        assert torch.equal(
            getattr(det, f.name)[:1].nan_to_num(-1), getattr(alone, f.name).nan_to_num(-1)
        )
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        seg.locate(image[None], ["cup"])
