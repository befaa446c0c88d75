"""Edit metrics on rendered ShapeWorld pairs with known answers; LPIPS and CLIP on tiny random
networks from local files; 2 gloo processes compute what one process computes."""

import math
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from helpers import save_tiny_clip

from lit_grpo.datamodules.shapeworld import Edit, ShapeWorld, apply_edit, render
from lit_grpo.metrics import (
    LPIPS,
    BackgroundL1,
    CLIPScore,
    EditMetrics,
    RotationAccuracy,
    RotationError,
    ScaleAccuracy,
    TranslationAccuracy,
    format_table,
)
from lit_grpo.metrics.base import select_rows
from lit_grpo.metrics.lpips import ALEXNET_FILE
from lit_grpo.perception.segmenters import ColourSegmenter
from lit_grpo.rewards import EditSpec, RewardInputs, TranslationReward

SEG = ColourSegmenter()
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _data(n: int, tasks=("translate", "rotate", "scale"), seed: int = 0):
    ds = ShapeWorld("test", n, tasks=tasks, seed=seed)
    return ds, torch.utils.data.default_collate([ds[i] for i in range(n)])


def _scores(edited, batch, **kwargs):
    """EditMetrics.compute() for `edited` as the edit of every sample of `batch`."""
    metrics = EditMetrics(**kwargs)
    before = SEG(batch["source"], batch["object"])
    metrics.update(batch["source"], edited, batch, before, SEG(edited, batch["object"]))
    return metrics.compute()


def _blank(batch):
    return torch.full_like(batch["source"], 0.5)  # no palette colour: nothing to find


def _opposite_moves(ds):
    """Each translation rendered in the opposite direction of the instructed one."""
    images = []
    for i in range(len(ds)):
        scene, edit, _ = ds.scene(i)
        wrong = Edit(edit.task, edit.target, direction=OPPOSITE[edit.direction])
        image, _ = render(apply_edit(scene, wrong, ds.resolution, ds.move_fraction), ds.resolution)
        images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
    return torch.stack(images)


# --- known answers ------------------------------------------------------------------------


def test_the_target_as_the_edit_scores_perfectly():
    ds, batch = _data(48)
    r = _scores(batch["target"], batch)
    counts = {t: batch["task"].count(t) for t in r}
    assert set(r) == {"translate", "rotate", "scale"} and min(counts.values()) > 5
    for task, row in r.items():
        assert row["n"] == counts[task]
        assert row["found"] == 1.0 and row["accuracy"] == 1.0
        # masks are coverage >= 0.5 grown by 1 px; a thin triangle tip can reach a pixel further
        assert row["background_l1"] < 1e-4
    # every move is move_fraction of the side; centres are sub-pixel exact
    assert r["translate"]["distance"] == pytest.approx(ds.move_fraction, abs=0.01)
    assert r["rotate"]["rotation_error"] < 3 / 180
    assert r["translate"]["geneval_accuracy"] == 1.0
    assert set(r["translate"]) == {
        "n",
        "found",
        "distance",
        "accuracy",
        "geneval_accuracy",
        "background_l1",
    }
    assert set(r["scale"]) == {"n", "found", "accuracy", "background_l1"}


def test_a_move_the_wrong_way_scores_zero_accuracy_and_a_negative_distance():
    ds, batch = _data(16, tasks=("translate",))
    r = _scores(_opposite_moves(ds), batch)["translate"]
    assert r["accuracy"] == 0.0 and r["geneval_accuracy"] == 0.0
    assert r["distance"] < -0.8 * ds.move_fraction  # about -1 move, less where it left the frame
    assert r["background_l1"] > 0.0  # the object now covers background


def test_the_source_returned_unchanged_keeps_the_background_and_fails_every_task():
    _, batch = _data(48)
    r = _scores(batch["source"], batch)
    for row in r.values():
        assert row["background_l1"] == 0.0 and row["accuracy"] == 0.0 and row["found"] == 1.0
    assert r["translate"]["distance"] == pytest.approx(0.0, abs=1e-3)
    instructed = batch["angle"][[t == "rotate" for t in batch["task"]]].abs()
    assert r["rotate"]["rotation_error"] == pytest.approx(instructed.mean().item() / 180, abs=0.01)


def test_an_edit_without_the_object_counts_as_a_failure():
    _, batch = _data(48)
    r = _scores(_blank(batch), batch, rotation_degrees=True)
    for row in r.values():
        assert row["found"] == 0.0 and row["accuracy"] == 0.0 and row["background_l1"] > 0.05
    assert r["translate"]["distance"] == 0.0
    assert r["rotate"]["rotation_error"] == 180.0


def test_thresholds_are_constructor_arguments():
    _, batch = _data(48)
    before = SEG(batch["source"], batch["object"])
    unchanged = (batch["source"], batch["source"], batch, before, before)
    loose = ScaleAccuracy(max_log_error=0.5)  # accepts x0.75 (0.29) and x1.5 (0.41), not x0.5, x2
    loose.update(*unchanged)
    factors = batch["factor"][[t == "scale" for t in batch["task"]]]
    expected = ((factors == 0.75) | (factors == 1.5)).float().mean()
    assert 0 < expected < 1 and loose.compute() == pytest.approx(expected.item())
    strict = TranslationAccuracy(min_move=0.3)  # the instructed move is 0.25 of the side
    target = (
        batch["source"],
        batch["target"],
        batch,
        before,
        SEG(batch["target"], batch["object"]),
    )
    strict.update(*target)
    assert strict.compute() == 0.0
    wide = RotationAccuracy(max_degrees=180.0)
    wide.update(*unchanged)
    assert wide.compute() == 1.0


def test_a_single_metric_scores_only_its_own_task():
    _, batch = _data(48)
    before, after = SEG(batch["source"], batch["object"]), SEG(batch["target"], batch["object"])
    acc, l1_scale = TranslationAccuracy(), BackgroundL1(task="scale")
    for m in (acc, l1_scale):
        m.update(batch["source"], batch["target"], batch, before, after)
    assert acc.compute() == 1.0 and acc.count == batch["task"].count("translate")
    assert l1_scale.count == batch["task"].count("scale")
    with pytest.raises(ValueError, match="'rotate' edits only"):
        RotationError().for_task("scale")
    no_task = {k: v for k, v in batch.items() if k != "task"}
    with pytest.raises(KeyError, match="needs a 'task' field"):
        acc.update(batch["source"], batch["target"], no_task, before, after)


def test_the_metrics_measure_what_the_translation_reward_measures():
    """One implementation of the measurements: metric and reward agree edit by edit."""
    ds, batch = _data(16, tasks=("translate",))
    edited = torch.cat([batch["target"][:8], _opposite_moves(ds)[8:]])
    before, after = SEG(batch["source"], batch["object"]), SEG(edited, batch["object"])
    reward = TranslationReward()(
        RewardInputs(
            edited, batch["source"], batch["instruction"], EditSpec.from_batch(batch), before, after
        )
    )
    acc = TranslationAccuracy()
    acc.update(batch["source"], edited, batch, before, after)
    assert acc.compute() == reward.extras["translation_success"].mean() == 0.5


def test_format_table_shows_each_task_with_dashes_where_a_column_does_not_apply():
    _, batch = _data(24)
    r = _scores(batch["target"], batch, tasks=("translate", "scale"))
    lines = format_table(r).splitlines()
    assert lines[0].split() == [
        "task",
        "n",
        "found",
        "distance",
        "accuracy",
        "GenEval",
        "acc.",
        "rot.",
        "error",
        "bg",
        "L1",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"translate", "scale"}  # rotate was not asked for
    assert rows["translate"][1:8] == [
        str(batch["task"].count("translate")),
        "1.000",
        "+0.250",
        "1.000",
        "1.000",
        "-",
        "0.0000",
    ]
    assert rows["scale"][3] == "-" and rows["scale"][5] == "-" and rows["scale"][6] == "-"
    assert "LPIPS" not in lines[0] and "CLIP" not in lines[0]


def test_tasks_without_edits_are_left_out():
    _, batch = _data(8, tasks=("scale",))
    assert set(_scores(batch["target"], batch)) == {"scale"}
    with pytest.raises(ValueError, match="subset"):
        EditMetrics(tasks=("translate", "fly"))


# --- LPIPS ----------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch, offline):
    """An empty $TORCH_HOME; torch.hub reads it."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case anything called set_dir
    assert torch.hub.get_dir() == str(home / "hub")
    return home


def _random_alexnet(path):
    """A random torchvision AlexNet state dict; only the conv layers (LPIPS' backbone), as
    the 230 MB classifier would only slow the test down."""
    torch.manual_seed(0)
    features = torchvision.models.AlexNet().features.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


def test_lpips_reads_the_backbone_from_torch_home_and_scores_background_changes(torch_home):
    _random_alexnet(torch_home / "hub" / "checkpoints" / ALEXNET_FILE)
    _, batch = _data(12)
    before, after = SEG(batch["source"], batch["object"]), SEG(batch["target"], batch["object"])

    def score(edited, **kwargs):
        m = LPIPS(**kwargs)
        m.update(batch["source"], edited, batch, before, after)
        return m.compute().item()

    assert score(batch["source"]) == 0.0  # identical images
    # a perfect edit changes only the object's regions (but for thin triangle tips, see above)
    assert score(batch["target"]) < 1e-5
    assert score(batch["target"], region="image") > 0.0  # whole image: the edit itself counts
    assert score(_blank(batch)) > 0.0
    assert score(_blank(batch), min_size=64) != score(_blank(batch))  # 32 px upsampled to 64
    with pytest.raises(ValueError, match=">= 31"):
        LPIPS(min_size=16)


def test_lpips_takes_an_explicit_file_and_names_the_missing_one(torch_home, tmp_path):
    expected = torch_home / "hub" / "checkpoints" / ALEXNET_FILE
    with pytest.raises(FileNotFoundError) as err:
        LPIPS()
    assert str(expected) in str(err.value) and "weights=" in str(err.value)
    elsewhere = tmp_path / "nets" / "my_alexnet.pth"
    with pytest.raises(FileNotFoundError, match="my_alexnet.pth"):
        LPIPS(weights=str(elsewhere))
    _random_alexnet(elsewhere)
    _, batch = _data(4, tasks=("rotate",))
    small = torch.nn.functional.interpolate(batch["source"], size=16)  # below AlexNet's 31 px
    m = LPIPS(weights=str(elsewhere), region="image")
    det = SEG(batch["source"], batch["object"])
    m.update(small, small.flip(-1), batch, det, det)
    assert m.compute() > 0.0


def test_edit_metrics_share_the_lpips_network_across_tasks_and_keep_it_out_of_checkpoints(
    torch_home,
):
    _random_alexnet(torch_home / "hub" / "checkpoints" / ALEXNET_FILE)
    metrics = EditMetrics(lpips=LPIPS())
    judges = {id(metrics.per_task[t]["lpips"].judge) for t in ("translate", "rotate", "scale")}
    assert len(judges) == 1 and metrics.state_dict() == {}
    _, batch = _data(12)
    before = SEG(batch["source"], batch["object"])
    metrics.update(
        batch["source"], _blank(batch), batch, before, SEG(_blank(batch), batch["object"])
    )
    r = metrics.compute()
    assert all(row["lpips"] > 0 for row in r.values())
    assert "LPIPS" in format_table(r).splitlines()[0]


# --- CLIP score -----------------------------------------------------------------------------


def test_clip_score_of_a_tiny_random_model_from_local_files(tmp_path, offline):
    import open_clip

    config, weights, net = save_tiny_clip(tmp_path)

    with pytest.raises(FileNotFoundError, match="missing.bin"):
        CLIPScore(str(config), str(tmp_path / "missing.bin"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        CLIPScore("ViT-B-32", "openai")  # a tag, not a file: refused, not fetched
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        CLIPScore("No-Such-ViT", str(weights))

    _, batch = _data(8)
    det = SEG(batch["source"], batch["object"])
    metrics = EditMetrics(clip=CLIPScore(str(config), str(weights)))
    metrics.update(batch["source"], batch["target"], batch, det, det)
    r = metrics.compute()
    values = [row["clip"] for row in r.values()]
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values)
    # the same number by hand: 100 * max(cos, 0) of open_clip's embeddings
    net.eval()
    with torch.no_grad():
        normalise = torchvision.transforms.Normalize(
            open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        )
        image = net.encode_image(normalise(batch["target"]), normalize=True)  # already 32 px
        text = net.encode_text(open_clip.tokenize(batch["instruction"]), normalize=True)
    by_hand = (100 * (image * text).sum(-1).clamp_min(0)).mean()
    total = sum(row["clip"] * row["n"] for row in r.values()) / len(batch["task"])
    assert total == pytest.approx(by_hand.item(), rel=1e-4)
    assert "CLIP" in format_table(r).splitlines()[0]


# --- DDP: 2 gloo processes compute what one process computes -------------------------------

N_DDP = 24


def _ddp_inputs():
    """Varied edits: targets, sources, blanks and noisy targets."""
    _, batch = _data(N_DDP, seed=5)
    g = torch.Generator().manual_seed(0)
    noisy = (batch["target"] + 0.05 * torch.randn(batch["target"].shape, generator=g)).clamp(0, 1)
    choices = [batch["target"], batch["source"], _blank(batch), noisy]
    edited = torch.stack([choices[i % 4][i] for i in range(N_DDP)])
    before, after = SEG(batch["source"], batch["object"]), SEG(edited, batch["object"])
    return batch["source"], edited, batch, before, after


def _rows(rank: int, tasks: list[str]) -> torch.Tensor:
    """Rank 0: ten edits, none a rotation (a task one rank never sees); rank 1: the rest."""
    rank0 = [i for i, t in enumerate(tasks) if t != "rotate"][:10]
    rows = torch.zeros(len(tasks), dtype=torch.bool)
    rows[rank0] = True
    return rows if rank == 0 else ~rows


def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        inputs = _ddp_inputs()
        inputs = select_rows(_rows(rank, inputs[2]["task"]), *inputs)
        metrics = EditMetrics(rotation_degrees=True)
        half = inputs[0].shape[0] // 2  # two batches per rank
        metrics.update(*select_rows(torch.arange(len(inputs[0])) < half, *inputs))
        metrics.update(*select_rows(torch.arange(len(inputs[0])) >= half, *inputs))
        torch.save(metrics.compute(), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_gloo_processes_compute_what_one_process_computes(tmp_path):
    inputs = _ddp_inputs()
    tasks = inputs[2]["task"]
    assert {t for t, r in zip(tasks, _rows(0, tasks)) if r} == {"translate", "scale"}
    single = EditMetrics(rotation_degrees=True)
    single.update(*inputs)
    expected = single.compute()
    assert set(expected) == {"translate", "rotate", "scale"}

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        _ddp_worker, args=(2, port, tmp_path), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):  # raises with the child's traceback if a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for task, row in expected.items():
            assert got[task] == pytest.approx(row, rel=1e-5, abs=1e-6), (rank, task)
    assert 0 < expected["translate"]["accuracy"] < 1  # a mix, not a trivial 0 or 1
