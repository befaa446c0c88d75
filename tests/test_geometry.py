"""The shared edit measurements of `lit_grpo.perception.geometry`, and the translation metrics
built on them, on hand-made detections against hand-computed numbers."""

import pytest
import torch

from lit_grpo.metrics import GenEvalTranslationAccuracy, TranslationAccuracy
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.detections import Detections
from lit_grpo.rewards import EditSpec, RewardInputs, TranslationReward

SIZE = (100, 100)  # (H, W) px: a displacement of 1 px is 0.01 of the side


def detections(boxes, found=None) -> Detections:
    """Detections whose centres are their boxes' centres; boxes (x0, y0, x1, y1) px."""
    box = torch.tensor(boxes, dtype=torch.float32)
    n = box.shape[0]
    return Detections(
        found=torch.ones(n, dtype=torch.bool) if found is None else torch.tensor(found),
        mask=torch.zeros(n, *SIZE, dtype=torch.bool),
        box=box,
        centre=(box[:, :2] + box[:, 2:]) / 2,
        angle=torch.zeros(n),
        area=(box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]),
    )


def moved(boxes, shifts) -> Detections:
    return detections(
        [[x0 + dx, y0 + dy, x1 + dx, y1 + dy] for (x0, y0, x1, y1), (dx, dy) in zip(boxes, shifts)]
    )


# --- along and across the instructed direction ----------------------------------------------


def test_along_across_on_the_axes():
    d = torch.tensor([[0.2, -0.1]] * 4)
    axes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    along, across = geo.along_across(d, axes)
    torch.testing.assert_close(along, torch.tensor([0.2, -0.2, -0.1, 0.1]))
    torch.testing.assert_close(across, torch.tensor([0.1, 0.1, 0.2, 0.2]))


def test_along_across_on_a_diagonal_direction():
    u = torch.tensor([[0.6, 0.8]] * 3)
    d = torch.tensor([[0.3, 0.4], [0.4, -0.3], [0.08, 0.06]])
    along, across = geo.along_across(d, u)
    # along the direction: 0.5 and no drift; perpendicular: 0 and 0.5; in between:
    # along 0.048 + 0.048 = 0.096, across |0.08 * 0.8 - 0.06 * 0.6| = 0.028
    torch.testing.assert_close(along, torch.tensor([0.5, 0.0, 0.096]))
    torch.testing.assert_close(across, torch.tensor([0.0, 0.5, 0.028]))
    # the swapped vector (0.8, 0.6) is not perpendicular to (0.6, 0.8): it would read 0.48,
    # 0.14 and 0.1 here


def test_along_across_normalises_the_direction():
    d = torch.tensor([[0.3, 0.4], [0.1, -0.3], [0.1, -0.3]])
    u = torch.tensor([[3.0, 4.0], [0.0, -2.0], [0.0, 0.0]])
    along, across = geo.along_across(d, u)
    torch.testing.assert_close(along, torch.tensor([0.5, 0.3, 0.0]))
    torch.testing.assert_close(across, torch.tensor([0.0, 0.1, 0.0]))  # zero direction: 0, 0


def test_translation_success_and_distance_on_a_diagonal_direction():
    before = detections([[10, 10, 20, 20]] * 3 + [[10, 10, 20, 20]])
    after = moved(before.box.tolist(), [(8, 6), (30, 40), (2, 3), (30, 40)])
    u = torch.tensor([[0.6, 0.8]] * 3 + [[-3.0, -4.0]])
    success = geo.translation_success(before, after, u, SIZE)
    # (0.08, 0.06): along 0.096 > 0.05 and > across 0.028 (the swapped vector read 0.1: a
    # failure); (0.3, 0.4): along 0.5; (0.02, 0.03): along 0.036, less than min_move;
    # the opposite way: along -0.5
    torch.testing.assert_close(success, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    distance = geo.translation_distance(before, after, u, SIZE)
    torch.testing.assert_close(distance, torch.tensor([0.096, 0.5, 0.036, -0.5]))


def test_translation_reward_penalises_the_true_sideways_drift():
    before = detections([[10, 10, 20, 20]] * 2)
    after = moved(before.box.tolist(), [(8, 6), (20, 0)])
    spec = EditSpec(
        task=["translate"] * 2,
        object=["red square"] * 2,
        direction=torch.tensor([[0.6, 0.8], [1.0, 0.0]]),
        angle=torch.zeros(2),
        factor=torch.ones(2),
    )
    images = torch.zeros(2, 3, *SIZE)
    out = TranslationReward(move_fraction=0.25, across_penalty=0.5)(
        RewardInputs(images, images, ["move it"] * 2, spec, before, after)
    )
    # 0.096 / 0.25 - 0.5 * 0.028 / 0.25 = 0.384 - 0.056; on the axis: 0.2 / 0.25 = 0.8
    torch.testing.assert_close(out.scores, torch.tensor([0.328, 0.8]))
    torch.testing.assert_close(out.extras["translation_success"], torch.tensor([1.0, 1.0]))


def ramp(a: float, b: float, shift=(0.0, 0.0), n: int = 1):
    """[n, 3, H, W] images 0.2 + a x + b y, moved by `shift` (dx, dy) px (a linear ramp)."""
    y, x = torch.meshgrid(
        torch.arange(SIZE[0]).float(), torch.arange(SIZE[1]).float(), indexing="ij"
    )
    image = 0.2 + a * (x - shift[0]) + b * (y - shift[1])
    return image.expand(n, 3, *SIZE).clone()


def test_scene_shift_reads_a_moved_ramp_exactly():
    keep = torch.ones(3, *SIZE, dtype=torch.bool)
    source = ramp(0.001, 0.002, n=3)
    # moved 2 px right, read along +x; 2 px right, read along -x; 2.5 px along (0.6, 0.8)
    edited = torch.cat([ramp(0.001, 0.002, (2, 0)), ramp(0.001, 0.002, (2, 0)),
                        ramp(0.001, 0.002, (1.5, 2.0))])  # fmt: skip
    direction = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    # along +x: edited - source = -0.002, the gradient 0.001 a px: s = 0.002 / 0.001 = 2;
    # along (0.6, 0.8): the change -0.0015 - 0.004 = -0.0055, the gradient 0.0006 + 0.0016
    shift = geo.scene_shift(source, edited, keep, direction)
    torch.testing.assert_close(shift, torch.tensor([2.0, -2.0, 2.5]))


def test_scene_shift_reads_only_the_kept_pixels_and_needs_texture():
    source = ramp(0.001, 0.0, n=3)
    edited = ramp(0.001, 0.0, (4, 0), n=3)
    edited[0, :, :, 50:] = source[0, :, :, 50:]  # the right half unmoved
    keep = torch.ones(3, *SIZE, dtype=torch.bool)
    keep[0, :, 50:] = False  # read the left half only
    flat = torch.full((1, 3, *SIZE), 0.5)
    direction = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    shift = geo.scene_shift(
        torch.cat([source[:2], flat]), torch.cat([edited[:2], flat + 0.1]), keep, direction
    )
    torch.testing.assert_close(shift[0], torch.tensor(4.0))
    # a ramp along x has nothing to read along y; a flat image nothing at all
    assert shift[1].isnan() and shift[2].isnan()


def test_translation_reward_takes_the_scene_shift_off():
    before = detections([[10, 10, 20, 20]] * 3)
    after = moved(before.box.tolist(), [(20, 0)] * 3)  # 0.2 of the side: 0.8 of the move
    spec = EditSpec(
        task=["translate"] * 3,
        object=["red square"] * 3,
        direction=torch.tensor([[1.0, 0.0]] * 3),
        angle=torch.zeros(3),
        factor=torch.ones(3),
    )
    source = ramp(0.001, 0.0, n=3)
    # the scene kept, moved 2 px with the object, moved 2 px against it
    edited = torch.cat([ramp(0.001, 0.0), ramp(0.001, 0.0, (2, 0)), ramp(0.001, 0.0, (-2, 0))])
    inputs = RewardInputs(edited, source, ["move it"] * 3, spec, before, after)
    plain = TranslationReward(move_fraction=0.25)(inputs)
    assert "scene_shift" not in plain.extras
    torch.testing.assert_close(plain.scores, torch.full((3,), 0.8))
    out = TranslationReward(move_fraction=0.25, scene_penalty=10.0)(inputs)
    # 2 px = 0.02 of the side = 0.08 of the move, 10 x 0.08 taken off either way
    torch.testing.assert_close(out.extras["scene_shift"], torch.tensor([0.0, 0.08, -0.08]))
    torch.testing.assert_close(out.scores, torch.tensor([0.8, 0.0, 0.0]))
    with pytest.raises(ValueError, match="scene_penalty"):
        TranslationReward(scene_penalty=-1.0)


def test_a_missed_object_is_nan():
    before = detections([[10, 10, 20, 20]] * 2)
    after = detections([[30, 10, 40, 20]] * 2, found=[True, False])
    success = geo.translation_success(before, after, torch.tensor([[1.0, 0.0]] * 2), SIZE)
    assert success[0] == 1.0 and success[1].isnan()


# --- GenEval's relation ---------------------------------------------------------------------

LEFT, RIGHT, UP, DOWN = [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]
BOX = [10, 10, 20, 20]  # 10 x 10 px: GenEval's margin is 0.1 x (10 + 10) = 2 px per axis
TALL = [10, 10, 12, 50]  # 2 x 40 px: margins 0.4 px in x, 8 px in y
SPECK = [10, 10, 12, 12]  # 2 x 2 px: margins 0.4 px
BIG = [20, 20, 60, 60]  # 40 x 40 px: margins 8 px


def relation(cases, **kwargs):
    """geneval_relation for (box, shift, direction) cases."""
    boxes, shifts, directions = zip(*cases)
    before, after = detections(list(boxes)), moved(boxes, shifts)
    return geo.geneval_relation(before, after, torch.tensor(directions), **kwargs)


def test_geneval_relation_on_straight_moves():
    got = relation(
        [
            (BOX, (5, 0), RIGHT),  # (5 - 2) / 5 = 0.6 > 0.5
            (BOX, (3, 0), RIGHT),  # (3 - 2) / 3 = 0.33: a move must exceed 0.4 of the size
            (BOX, (-5, 0), LEFT),
            (BOX, (-5, 0), RIGHT),  # "left of", not "right of"
            (BOX, (0, -5), UP),  # y down: "above"
            (BOX, (0, 5), DOWN),
            (BOX, (0, 5), UP),
            (BOX, (2, 0), RIGHT),  # the whole offset inside the margin: no relation at all
        ]
    )
    torch.testing.assert_close(got, torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0]))
    # without a margin only the 60 deg cone is left: (3 - 0) / 3 = 1
    assert relation([(BOX, (3, 0), RIGHT)], position_threshold=0.0).item() == 1.0


def test_geneval_relation_divides_by_the_unshrunk_offset_and_can_hold_twice():
    got = relation(
        [
            # offset (12, 22), |o| = 25.06; shrunk (11.6, 14): right 11.6 / 25.06 = 0.463,
            # down 14 / 25.06 = 0.559 (over the shrunk norm 18.18 right would read 0.638)
            (TALL, (12, 22), RIGHT),
            (TALL, (12, 22), DOWN),
            # offset (20, 30), |o| = 36.06; shrunk (19.6, 29.6): right 0.544 and down 0.821
            (SPECK, (20, 30), RIGHT),
            (SPECK, (20, 30), DOWN),
        ]
    )
    torch.testing.assert_close(got, torch.tensor([0.0, 1, 1, 1]))


def test_geneval_relation_needs_both_objects_and_an_axis_direction():
    before = detections([BOX, BOX])
    after = detections([[20, 10, 30, 20]] * 2, found=[True, False])
    got = geo.geneval_relation(before, after, torch.tensor([RIGHT, RIGHT]))
    assert got[0] == 1.0 and got[1].isnan()
    with pytest.raises(ValueError, match=r"row 1 is \(0.6, 0.8\)"):
        geo.geneval_relation(before, after, torch.tensor([RIGHT, [0.6, 0.8]]))


def test_geneval_accuracy_and_ours_disagree_where_their_rules_do():
    cases = [
        (BIG, (6, 0), RIGHT),  # ours: 0.06 > 0.05; GenEval: inside the 8 px margin
        (BIG, (0, -6), UP),  # likewise
        (SPECK, (20, 30), RIGHT),  # ours: along 0.2 < across 0.3; GenEval: 0.544 > 0.5
        (BOX, (25, 0), RIGHT),  # both
        (BOX, (-25, 0), LEFT),  # not found in the edit: a failure for both
        (BOX, (0, 0), [0.0, 0.0]),  # a rotation: neither metric reads it
    ]
    boxes, shifts, directions = zip(*cases)
    before = detections(list(boxes))
    after = moved(boxes, shifts)
    after.found[4] = False
    batch = {"task": ["translate"] * 5 + ["rotate"], "direction": torch.tensor(directions)}
    images = torch.zeros(6, 3, *SIZE)
    ours, geneval = TranslationAccuracy(), GenEvalTranslationAccuracy()
    for m in (ours, geneval):
        m.update(images, images, batch, before, after)
    assert ours.count == geneval.count == 5
    assert ours.compute().item() == pytest.approx(3 / 5)  # rows 0, 1, 3
    assert geneval.compute().item() == pytest.approx(2 / 5)  # rows 2, 3


# --- rotation: Talk2Move's in-plane rule and the shape check ---------------------------------


def test_talk2move_rotation_rule_by_hand():
    """[sense right] * (1 - |magnitude - instructed| / 180), 0 under 10 deg, the sense not
    checked for 180 (Talk2Move's evaluate_rotation, in the plane)."""
    from lit_grpo.rewards.spatial import talk2move_rotation_score

    turn = torch.tensor([90.0, 0.0, 9.9, 10.0, -90.0, 45.0, 180.0, -170.0, 135.0, float("nan")])
    wanted = torch.tensor([90.0, 90.0, 90.0, 90.0, 90.0, 90.0, -180.0, 180.0, -135.0, 90.0])
    score = talk2move_rotation_score(turn, wanted)
    expected = [1.0, 0.0, 0.0, 1 - 80 / 180, 0.0, 1 - 45 / 180, 1.0, 1 - 10 / 180, 0.0]
    torch.testing.assert_close(score[:-1], torch.tensor(expected))
    assert score[-1].isnan()
    # standing still earns nothing; the old rule (1 - error / 180) paid 0.5 for it
    assert talk2move_rotation_score(torch.tensor([0.0]), torch.tensor([90.0])).item() == 0.0
    loose = talk2move_rotation_score(torch.tensor([5.0]), torch.tensor([90.0]), min_turn=0.0)
    torch.testing.assert_close(loose, torch.tensor([1 - 85 / 180]))


def square_detections(mask: torch.Tensor, angle: float = 0.0) -> Detections:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    centre = torch.stack([xs.float().mean() + 0.5, ys.float().mean() + 0.5])
    return Detections(
        found=torch.tensor([True]),
        mask=mask[None],
        box=torch.zeros(1, 4),
        centre=centre[None],
        angle=torch.tensor([angle]),
        area=mask.sum().float()[None],
    )


def test_shape_iou_by_hand():
    """An L of 3 pixels turned by 90 deg ccw (as seen, y down) and moved is the same shape
    (IoU 1); the unturned L over it shares 2 of 4 pixels (1/2); a 3x3 blob over it 3/9."""
    src = torch.zeros(12, 12, dtype=torch.bool)
    src[2, 2] = src[3, 2] = src[3, 3] = True  # (row, col): an L with its foot to the right
    before = square_detections(src)
    # a ccw turn as seen by 90 deg maps the offset (dx, dy) to (dy, -dx): the foot (+x)
    # points up (-y); the L placed 5 px to the right and 5 down
    turned = torch.zeros(12, 12, dtype=torch.bool)
    turned[7, 8] = turned[8, 8] = turned[8, 7] = True
    after = square_detections(turned)
    # centres: src (2.83, 3.17) in (x, y) + 0.5; turned around its own centre
    assert geo.shape_iou(before, after, torch.tensor([90.0])).item() == pytest.approx(1.0)
    assert geo.shape_iou(before, after, torch.tensor([-90.0])).item() < 1.0
    copy = torch.zeros(12, 12, dtype=torch.bool)
    copy[7, 7] = copy[8, 7] = copy[8, 8] = True  # the unturned L at the same place
    assert geo.shape_iou(before, square_detections(copy), torch.tensor([0.0])).item() == 1.0
    assert geo.shape_iou(
        before, square_detections(copy), torch.tensor([90.0])
    ).item() == pytest.approx(2 / 4)
    blob = torch.zeros(12, 12, dtype=torch.bool)
    blob[7:10, 7:10] = True
    assert geo.shape_iou(
        before, square_detections(blob), torch.tensor([0.0])
    ).item() == pytest.approx(3 / 9)
    assert geo.shape_iou(before, after, torch.tensor([float("nan")])).isnan().all()


def test_rotation_reward_on_shapeworld_edits_copies_and_blurs():
    """Exact edits score ~1, a copy of the source 0 (standing still), another task 0; a
    smear whose heading reads right but whose shape is gone scores 0 (the shape check)."""
    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception import ColourSegmenter
    from lit_grpo.rewards import RotationReward, Scorer

    data = ShapeWorld("test", 16, 32, ("rotate",))
    batch = torch.utils.data.default_collate([data[i] for i in range(16)])
    scorer = Scorer([RotationReward()], ColourSegmenter())

    def inputs(images):
        return scorer.observe(images, batch)  # what a reward sees: no ground truth

    exact = RotationReward()(inputs(batch["target"]))
    assert exact.scores.min() > 0.95
    assert (exact.extras["shape_iou"] > 0.7).all()
    assert torch.equal(RotationReward()(inputs(batch["source"])).scores, torch.zeros(16))
    # a smear: the target's pixel-wise minimum with itself shifted 1-3 px left and right;
    # the segmenter still reads a heading (some of them right) but the shape is gone
    smear = batch["target"].clone()
    for shift in (1, 2, 3):
        for sign in (1, -1):
            smear = torch.minimum(smear, batch["target"].roll(sign * shift, dims=-1))
    smeared = RotationReward()(inputs(smear))
    iou = smeared.extras["shape_iou"]
    assert torch.equal(smeared.scores[iou < 0.5], torch.zeros(int((iou < 0.5).sum())))
    assert (iou < 0.5).sum() >= 8
    unguarded = RotationReward(min_shape_iou=0.0)(inputs(smear))
    assert unguarded.scores[iou < 0.5].max() > 0
    with pytest.raises(ValueError, match="min_shape_iou"):
        RotationReward(min_shape_iou=2.0)
