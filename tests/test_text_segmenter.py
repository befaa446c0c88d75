"""SamClipSegmenter's mechanics with tiny random SAM and open_clip models, and the
orientation estimators on synthetic masks with known angles."""

import math

import pytest
import torch
from helpers import save_tiny_clip, tiny_clip_scorer, tiny_sam

from lit_grpo.checks import ConfigError
from lit_grpo.datamodules.shapeworld import Scene, Shape, render
from lit_grpo.perception import MaskAxisOrientation, OrientationEstimator, SamClipSegmenter
from lit_grpo.perception.orientation import mask_moments
from lit_grpo.perception.segmenters import Segmenter
from lit_grpo.perception.text_segmenter import load_clip_scorer, load_sam

GREY = (0.5, 0.5, 0.5)


def scene_image(shapes, size=48):
    image, cov = render(Scene((GREY, GREY), tuple(shapes)), size)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(cov >= 0.5)


class AreaScorer:
    """A stand-in for CLIP whose ranking is known: the score of a mask is its pixel share
    plus `bonus`; it records every call."""

    def __init__(self, bonus=0.0):
        self.bonus, self.calls = bonus, []

    def __call__(self, image, masks, phrase):
        self.calls.append((tuple(image.shape), tuple(masks.shape), phrase))
        return masks.flatten(1).float().mean(1) + self.bonus


# --- orientation ------------------------------------------------------------------------------


def rectangle(h, w, half_len, half_wid, heading_deg):
    """Pixels whose centres lie in a rectangle centred on the image centre, its long axis at
    `heading_deg` (ccw as seen, 0 = up)."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    u, v = xs - w / 2, -(ys - h / 2)
    a = math.radians(heading_deg)
    along, across = u * -math.sin(a) + v * math.cos(a), u * math.cos(a) + v * math.sin(a)
    return (along.abs() <= half_len) & (across.abs() <= half_wid)


@pytest.mark.parametrize("heading", [0, 45, 90, 135])
def test_principal_axis_of_symmetric_rectangles_is_exact(heading):
    # symmetric about the axis on the pixel grid: the moments give the angle to rounding
    axis, elongation, skew, _ = mask_moments(rectangle(64, 64, 24.0, 6.0, heading))
    assert axis == pytest.approx(heading, abs=1e-9)
    assert elongation > 3 and skew == pytest.approx(0.0, abs=1e-9)


def test_principal_axis_of_a_rotated_rectangle_is_within_rasterisation():
    for heading in (10.0, 30.0, 100.0, 160.0):
        axis, *_ = mask_moments(rectangle(200, 200, 80.0, 16.0, heading))
        assert abs(axis - heading) < 0.3


def test_a_rectangle_has_no_head_so_the_estimator_says_nan():
    masks = torch.stack([rectangle(64, 64, 24.0, 6.0, 30.0), torch.zeros(64, 64, dtype=bool)])
    out = MaskAxisOrientation().headings(torch.zeros(2, 3, 64, 64), masks)
    assert out.isnan().all()  # no head, and an empty mask


def test_triangle_headings_over_360_degrees():
    est = MaskAxisOrientation()
    assert isinstance(est, OrientationEstimator)
    angles = [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 300.0, 350.0]
    masks = torch.stack(
        [scene_image([Shape("triangle", "red", 64, 64, 40, a)], 128)[1][0] for a in angles]
    )
    got = est.headings(torch.zeros(len(angles), 3, 128, 128), masks)
    err = (got - torch.tensor(angles) + 180) % 360 - 180
    # exact at multiples of 45 deg (the raster is symmetric); measured max 0.3 deg elsewhere
    assert err[:6].abs().max() < 1e-4 and err.abs().max() < 0.5
    circle = scene_image([Shape("circle", "red", 64, 64, 40, 0.0)], 128)[1]
    assert est.headings(torch.zeros(1, 3, 128, 128), circle).isnan().all()  # no axis


# --- the crop scorer and the loaders ------------------------------------------------------------


def test_crops_show_the_masked_object_on_grey_and_scores_are_cosines():
    scorer = tiny_clip_scorer()
    image, cov = scene_image(
        [Shape("square", "red", 12, 12, 6, 0.0), Shape("circle", "blue", 34, 30, 7, 0.0)]
    )
    crops = scorer.crops(image, cov)
    assert crops.shape == (2, 3, 32, 32)
    # the red square's crop: red and grey only (no blue, no other object)
    red = crops[0].permute(1, 2, 0).reshape(-1, 3)
    assert red[:, 2].max() <= 0.5 + 1e-6 and red[:, 0].max() > 0.85
    assert (crops[0, :, 0, 0] - 0.5).abs().max() < 1e-6  # padding is grey
    scores = scorer(image, cov, "the red square")
    assert scorer.text("the red square") == "a photo of a red square."
    x = (crops - scorer.mean) / scorer.std
    img = torch.nn.functional.normalize(scorer.model.encode_image(x), dim=-1)
    txt = scorer.model.encode_text(scorer.tokenizer(["a photo of a red square."]))
    expected = img @ torch.nn.functional.normalize(txt, dim=-1)[0]
    assert torch.allclose(scores, expected, atol=1e-6)
    assert scorer(image, cov[:0], "x").shape == (0,)


def test_loaders_name_missing_files_and_refuse_bad_ones(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="sam_checkpoint: .*sam_b.pth") as err:
        SamClipSegmenter(str(tmp_path / "sam_b.pth"), str(tmp_path / "clip.bin"))
    assert "clip_checkpoint: " in str(err.value) and "never downloads" in str(err.value)
    with pytest.raises(FileNotFoundError, match="sam_b.pth"):
        load_sam(tmp_path / "sam_b.pth")
    with pytest.raises(FileNotFoundError, match="clip.bin"):
        load_clip_scorer("ViT-B-32", tmp_path / "clip.bin")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_sam(junk)
    with pytest.raises(ConfigError, match="unknown SAM architecture"):
        load_sam(junk, "vit_q")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    import segment_anything

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", tiny_sam)
    with pytest.raises(ConfigError, match="do not fit SAM 'vit_b'"):
        load_sam(tmp_path / "other.pth")


def test_the_path_constructor_loads_local_weights_into_built_models(tmp_path, monkeypatch):
    import segment_anything

    sam = tiny_sam()
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    config, weights, clip = save_tiny_clip(tmp_path, "lit-grpo-tiny-clip-seg.json", seed=1)
    # the registry's builders make full-size models: a tiny one stands in for vit_b
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", tiny_sam)
    seg = SamClipSegmenter(str(tmp_path / "sam.pth"), weights, clip_model=config)
    for name, value in sam.state_dict().items():
        assert torch.equal(seg.sam.state_dict()[name], value)
    for name, value in clip.state_dict().items():
        assert torch.equal(seg.scorer.model.state_dict()[name], value)
    assert seg.scorer.size == (32, 32)
    assert isinstance(seg, Segmenter) and isinstance(seg.orientation, MaskAxisOrientation)


# --- the segmenter --------------------------------------------------------------------------------


def test_proposals_are_distinct_masks_within_the_area_limits():
    seg = SamClipSegmenter.from_models(
        tiny_sam(), AreaScorer(), points_per_side=4, min_quality=-10, min_area=0.05, max_area=0.8
    )
    image, _ = scene_image([Shape("triangle", "red", 24, 24, 12, 0.0)])
    masks, quality = seg.propose(image)
    assert masks.dtype == torch.bool and masks.shape[1:] == (48, 48)
    assert 1 <= masks.shape[0] <= 3 * 16 and quality.shape == (masks.shape[0],)
    assert (quality[:-1] >= quality[1:]).all()  # best first
    area = masks.flatten(1).float().mean(1)
    assert ((area >= 0.05) & (area <= 0.8)).all()
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    iou = inter / (flat.sum(1)[:, None] + flat.sum(1)[None] - inter)
    assert (iou.triu(1) <= 0.95).all()  # no near-duplicates (0.9 on the coarse grid)


def test_the_highest_scoring_proposal_wins_and_fills_the_detection():
    scorer = AreaScorer()
    seg = SamClipSegmenter.from_models(
        tiny_sam(), scorer, threshold=0.0, points_per_side=4, min_quality=-10, min_area=0.02
    )
    images = torch.stack(
        [scene_image([Shape("triangle", "red", 24, 24, 12, a)])[0] for a in (0, 90)]
    )
    det = seg(images, ["red triangle", "the red triangle"])
    assert det.found.all() and [c[2] for c in scorer.calls] == ["red triangle", "the red triangle"]
    for i in range(2):
        proposals, _ = seg.propose(images[i])
        best = proposals[proposals.flatten(1).float().mean(1).argmax()]
        assert torch.equal(det.mask[i], best)  # the winner is the proposal scored highest
        ys, xs = torch.nonzero(best, as_tuple=True)
        assert det.area[i] == best.sum()
        assert det.box[i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert torch.allclose(det.centre[i], torch.stack([xs.float(), ys.float()]).mean(1) + 0.5)
        expected = MaskAxisOrientation().headings(images[i : i + 1], best[None])[0]
        assert torch.equal(det.angle[i], expected) or (det.angle[i].isnan() and expected.isnan())


def test_an_object_scored_below_the_threshold_is_not_found_and_the_reward_fails():
    from lit_grpo.rewards.base import EditSpec, RewardInputs
    from lit_grpo.rewards.spatial import RotationReward

    seg = SamClipSegmenter.from_models(
        tiny_sam(), AreaScorer(bonus=-5.0), points_per_side=4, min_quality=-10, min_area=0.02
    )
    image, _ = scene_image([Shape("triangle", "red", 24, 24, 12, 0.0)])
    det = seg(image[None], ["a unicorn"])
    assert not det.found.any() and not det.mask.any() and det.angle.isnan().all()
    assert det.box.eq(0).all() and det.area.eq(0).all()
    spec = EditSpec(
        ["rotate"], ["a unicorn"], torch.zeros(1, 2), torch.tensor([90.0]), torch.ones(1)
    )
    inputs = RewardInputs(image[None], image[None], ["rotate"], spec, det, det)
    assert RotationReward()(inputs).scores.tolist() == [0.0]  # a miss scores the minimum
    # nothing proposed at all (every proposal filtered) is the same miss, not an error
    empty = SamClipSegmenter.from_models(
        tiny_sam(), AreaScorer(), points_per_side=2, min_quality=10
    )
    assert not empty(image[None], ["red triangle"]).found.any()


def test_a_users_orientation_estimator_fills_the_angle():
    class Fixed:
        def __init__(self, degrees: float = 33.0):
            self.degrees = degrees

        def headings(self, images, masks):
            return torch.full((masks.shape[0],), self.degrees)

    seg = SamClipSegmenter.from_models(
        tiny_sam(),
        AreaScorer(),
        threshold=0.0,
        points_per_side=2,
        min_quality=-10,
        orientation=Fixed(),
    )
    image, _ = scene_image([Shape("triangle", "red", 24, 24, 12, 0.0)])
    det = seg(image[None], ["red triangle"])
    assert det.found.all() and det.angle.tolist() == [33.0]


def test_inputs_are_checked_and_copies_share_the_segmenter():
    seg = SamClipSegmenter.from_models(tiny_sam(), AreaScorer(), points_per_side=2, min_quality=-10)
    import copy

    assert copy.deepcopy(seg) is seg  # an EMA copy of the module shares the judges
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        seg(torch.zeros(3, 8, 8), ["x"])
    with pytest.raises(ValueError, match="2 phrases for 1 images"):
        seg(torch.zeros(1, 3, 8, 8), ["x", "y"])
