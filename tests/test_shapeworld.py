"""ShapeWorld: determinism, field contracts, and that every edit is exactly what its text says."""

import colorsys
import itertools
import math

import numpy as np
import pytest
import torch

from lit_grpo.datamodules.shapeworld import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    TASKS,
    VOCABULARY,
    Edit,
    Scene,
    Shape,
    ShapeWorld,
    apply_edit,
    render,
    shape_extent,
    shape_vertices,
)

TENSOR_KEYS = (
    "source",
    "target",
    "direction",
    "angle",
    "factor",
    "mask_before",
    "mask_after",
    "box_before",
    "box_after",
    "centre_before",
    "centre_after",
)
AREA = {"circle": math.pi, "square": 2.0, "triangle": 0.9}  # area / size**2


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
    )


def _box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _expected_edit(text: str) -> tuple[str, object]:
    """Read the edit back from the instruction text alone (independent of the generator)."""
    words = text.split()
    if words[0] in ("move", "shift", "slide", "drag"):
        word = next(w for w in words if w.removesuffix("wards") in DIRECTIONS)
        return "translate", word.removesuffix("wards")
    if words[0] in ("rotate", "turn", "spin"):
        degrees = next(float(w) for w in words if w.isdigit())
        return "rotate", -degrees if "clockwise" in words else degrees
    if "half" in words:
        return "scale", 0.5
    if "twice" in words or "double" in words:
        return "scale", 2.0
    if "three" in words:
        return "scale", 0.75
    return "scale", next(float(w) for w in words if w[0].isdigit())


def test_same_arguments_give_bit_identical_samples():
    a, b = ShapeWorld(size=60, seed=7), ShapeWorld(size=60, seed=7)
    for i in (0, 1, 17, 59):
        assert _same(a[i], b[i])
        assert _same(a[i], a[i])
        assert a.scene(i) == b.scene(i)


def test_splits_and_seeds_give_different_samples():
    worlds = [ShapeWorld(split=s, size=40) for s in ("train", "val", "test")]
    worlds.append(ShapeWorld(size=40, seed=1))
    for i in range(40):
        sources = [w[i]["source"] for w in worlds]
        for x, y in itertools.combinations(sources, 2):
            assert not torch.equal(x, y)


@pytest.mark.parametrize("resolution", [24, 32, 64])
def test_fields_have_documented_shapes_types_and_ranges(resolution):
    ds = ShapeWorld(split="val", size=30, resolution=resolution)
    r = resolution
    for i in range(30):
        s = ds[i]
        assert s["index"] == i and isinstance(s["index"], int)
        for key in ("source", "target"):
            assert s[key].shape == (3, r, r) and s[key].dtype == torch.float32
            assert 0.0 <= s[key].min() and s[key].max() <= 1.0
        for key in ("mask_before", "mask_after"):
            assert s[key].shape == (r, r) and s[key].dtype == torch.bool and s[key].any()
        for when in ("before", "after"):
            box, centre = s[f"box_{when}"], s[f"centre_{when}"]
            assert box.shape == (4,) and box.dtype == torch.float32
            assert box.tolist() == _box(s[f"mask_{when}"])
            assert centre.shape == (2,) and centre.dtype == torch.float32
            assert box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3]
        for key in ("angle", "factor"):
            assert s[key].shape == () and s[key].dtype == torch.float32
        assert s["direction"].shape == (2,) and s["direction"].dtype == torch.float32
        assert s["task"] in TASKS
        colour, kind = s["object"].split()
        assert colour in COLORS and kind in SHAPES
        assert s["object"] in s["instruction"]
        if s["task"] == "translate":
            assert s["direction"].norm().item() == pytest.approx(1.0)
        else:
            assert s["direction"].tolist() == [0.0, 0.0]
        assert (s["angle"].item() != 0) == (s["task"] == "rotate")
        assert (s["factor"].item() != 1) == (s["task"] == "scale")


def test_default_collate_batches_samples():
    ds = ShapeWorld(size=8)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    assert batch["source"].shape == (8, 3, 32, 32)
    assert batch["mask_after"].shape == (8, 32, 32)
    assert batch["angle"].shape == (8,) and batch["index"].tolist() == list(range(8))
    assert isinstance(batch["instruction"], list) and len(batch["instruction"]) == 8


@pytest.mark.parametrize("resolution", [32, 48])
def test_target_changes_exactly_where_the_object_was_or_is(resolution):
    ds = ShapeWorld(size=80, resolution=resolution, seed=2)
    for i in range(80):
        s = ds[i]
        scene, edit, _ = ds.scene(i)
        _, cov_before = render(scene, resolution)
        _, cov_after = render(apply_edit(scene, edit, resolution, ds.move_fraction), resolution)
        touched = torch.from_numpy((cov_before[edit.target] > 0) | (cov_after[edit.target] > 0))
        diff = (s["source"] != s["target"]).any(dim=0)
        assert not diff[~touched].any()  # bit-identical outside the object's footprint
        moved = s["mask_before"] ^ s["mask_after"]
        assert moved.any() and diff[moved].all()
        assert diff[s["mask_before"] | s["mask_after"]].float().mean() > 0.2


@pytest.mark.parametrize(("resolution", "move_fraction"), [(32, 0.25), (64, 0.2)])
def test_edit_does_what_the_instruction_says(resolution, move_fraction):
    ds = ShapeWorld(size=150, resolution=resolution, move_fraction=move_fraction, seed=5)
    for i in range(150):
        s = ds[i]
        scene, edit, text = ds.scene(i)
        before = scene.shapes[edit.target]
        after = apply_edit(scene, edit, resolution, move_fraction).shapes[edit.target]
        task, value = _expected_edit(s["instruction"])
        assert s["task"] == task == edit.task and text == s["instruction"]
        shift = (s["centre_after"] - s["centre_before"]).numpy()
        if task == "translate":
            expected = np.array(DIRECTIONS[value]) * move_fraction * resolution
            assert s["direction"].tolist() == list(DIRECTIONS[value])
            np.testing.assert_allclose(shift, expected, atol=1e-4)
        else:
            np.testing.assert_allclose(shift, 0.0, atol=1e-4)
        if task == "rotate":
            assert before.kind == "triangle" and s["angle"].item() == value
            turned = (after.angle - before.angle - value) % 360
            assert min(turned, 360 - turned) < 1e-6
        else:
            assert after.angle == before.angle
        if task == "scale":
            assert s["factor"].item() == value
            assert after.size / before.size == pytest.approx(value)
            ratio = s["mask_after"].sum().item() / s["mask_before"].sum().item()
            assert ratio == pytest.approx(value**2, rel=0.25)
        else:
            assert after.size == before.size


def test_scenes_are_inside_the_frame_and_do_not_overlap():
    for resolution in (32, 64):
        ds = ShapeWorld(size=120, resolution=resolution, seed=11)
        for i in range(120):
            scene, edit, _ = ds.scene(i)
            colours = [sh.colour for sh in scene.shapes]
            assert 1 <= len(scene.shapes) <= 3 and len(set(colours)) == len(colours)
            for state in (scene, apply_edit(scene, edit, resolution, ds.move_fraction)):
                _, cov = render(state, resolution)
                border = np.ones((resolution, resolution), dtype=bool)
                border[1:-1, 1:-1] = False
                assert not cov[:, border].any()
                assert ((cov > 0).sum(axis=0) <= 1).all()  # footprints are disjoint
                ys, xs = np.mgrid[:resolution, :resolution] + 0.5
                for sh, c in zip(state.shapes, cov):
                    x0, y0, x1, y1 = shape_extent(sh)
                    assert 1 <= x0 and 1 <= y0 and x1 <= resolution - 1 and y1 <= resolution - 1
                    # centre is the area centroid and size follows the documented convention
                    assert c.sum() == pytest.approx(AREA[sh.kind] * sh.size**2, rel=0.04)
                    centroid = ((c * xs).sum() / c.sum(), (c * ys).sum() / c.sum())
                    np.testing.assert_allclose(centroid, (sh.cx, sh.cy), atol=0.1)


def test_angles_are_counter_clockwise_as_seen():
    up = Shape("triangle", "red", 16.0, 16.0, 8.0, 0.0)
    apex = shape_vertices(up)[0]
    assert apex[1] < 16 and apex[0] == pytest.approx(16)
    scene = Scene(((0.5, 0.5, 0.5),) * 2, (up,))
    left = apply_edit(scene, Edit("rotate", 0, angle=90.0), 32, 0.25).shapes[0]
    apex = shape_vertices(left)[0]
    assert apex[0] < 16 and apex[1] == pytest.approx(16)
    _, cov = render(Scene(scene.background, (left,)), 32)
    # apex 8 px left of the centre, base 4 px right of it
    assert cov[0, 15:17, 9:12].min() > 0 and cov[0, 15:17, 12:20].min() == 1
    assert not cov[0, :, 21:].any() and not cov[0, :, :8].any()
    right = apply_edit(scene, Edit("rotate", 0, angle=-90.0), 32, 0.25).shapes[0]
    assert shape_vertices(right)[0][0] > 16 and right.angle == 270.0


@pytest.mark.parametrize("task", TASKS)
def test_every_instruction_word_is_in_the_vocabulary(task):
    ds = ShapeWorld(size=300, tasks=(task,), seed=3)
    vocabulary = set(VOCABULARY)
    seen = set()
    for i in range(300):
        scene, edit, text = ds.scene(i)
        assert edit.task == task
        assert set(text.split()) <= vocabulary, text
        target = scene.shapes[edit.target]
        assert f"{target.colour} {target.kind}" in text
        seen.add(text.split()[0])
    assert len(seen) >= 3  # several phrasings per task


def test_backgrounds_are_muted_and_far_from_the_palette():
    palette = np.array(list(COLORS.values()))
    ds = ShapeWorld(size=300, seed=4)
    for i in range(300):
        scene, _, _ = ds.scene(i)
        for t in np.linspace(0, 1, 9):
            rgb = np.array(scene.background[0]) * (1 - t) + np.array(scene.background[1]) * t
            assert colorsys.rgb_to_hsv(*rgb)[1] <= 0.2
            assert np.linalg.norm(palette - rgb, axis=1).min() > 0.45
    gaps = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(palette, 2)]
    assert min(gaps) > 0.45


def test_invalid_arguments_raise():
    for kwargs in (
        {"split": "dev"},
        {"tasks": ("flip",)},
        {"tasks": ()},
        {"resolution": 8},
        {"move_fraction": 0.0},
        {"size": -1},
    ):
        with pytest.raises(ValueError):
            ShapeWorld(**kwargs)
    ds = ShapeWorld(size=3)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError):
        apply_edit(ds.scene(0)[0], Edit("flip", 0), 32, 0.25)
