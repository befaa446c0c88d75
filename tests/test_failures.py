"""Runs that fail say so (issue 21 items 3 and 5): a run that trains nothing stops naming the
cause, non-finite rewards are counted and never logged as a mean of 0, a broken reward is
named in one line, and the remaining tracebacks of bad input are one line each."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    ConstantReward,
    NaNReward,
    Recorder,
    fit_steps,
    shapeworld_batch,
    store_client,
    tiny_module,
)
from test_user_errors import error_of

from lit_grpo.__main__ import main
from lit_grpo.modules import SpatialFlowGRPOModule
from lit_grpo.modules.stalls import InARow, TrainingStalled
from lit_grpo.modules.statistics import step_statistics
from lit_grpo.objectives.flow_grpo import group_advantages
from lit_grpo.perception import ColourSegmenter
from lit_grpo.policies import LoraSettings, TinyEditPolicy
from lit_grpo.rewards import RegionReward, Reward, RewardOutput, Scorer, Scores, TranslationReward
from lit_grpo.rewards.base import RewardFailed

ROOT = Path(__file__).resolve().parent.parent
GRPO = str(ROOT / "configs/talk2move.yaml")
TINY_GRPO = [
    "--trainer.enable_progress_bar=false",
    "--trainer.max_steps=4",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.group_size=3",
    "--model.init_args.sample_steps=5",
    "--model.init_args.eval_steps=2",
    "--data.init_args.resolution=16",
    "--data.init_args.batch_size=2",
    "--data.init_args.val_size=2",
]


class RaisingReward(Reward):
    name = "judge"

    def forward(self, inputs):
        raise RuntimeError("judge server unreachable\nsecond line")


class WrongShapeReward(Reward):
    name = "wrong"

    def forward(self, inputs):
        return RewardOutput(torch.zeros(inputs.images.shape[0], 2))


class BadExtrasReward(Reward):
    name = "extras"

    def forward(self, inputs):
        n = inputs.images.shape[0]
        return RewardOutput(torch.zeros(n), {"part": torch.zeros(n + 1)})


class TensorReward(Reward):
    name = "bare"

    def forward(self, inputs):
        return torch.zeros(inputs.images.shape[0])


def test_a_reward_that_raises_or_breaks_the_contract_is_named_in_one_line():
    batch = shapeworld_batch(2)
    line = RaisingReward.forward.__code__.co_firstlineno + 1

    def failure(*rewards) -> str:
        with pytest.raises(RewardFailed) as err:
            Scorer(list(rewards))(batch["source"], batch)
        return str(err.value)

    assert failure(RaisingReward()) == (
        "reward RaisingReward 'judge' raised RuntimeError: judge server unreachable (at "
        f"test_failures.py:{line}, in forward); fix the reward, or leave it out of "
        "model.init_args.rewards"
    )
    assert failure(TranslationReward(), WrongShapeReward()) == (
        "reward WrongShapeReward 'wrong' returned scores of shape (2, 2); the contract is "
        "[N] = (2,), one score per edit"
    )
    assert failure(BadExtrasReward()) == (
        "reward BadExtrasReward 'extras' returned extras['part'] of shape (3,); the contract "
        "is [N] = (2,), one score per edit"
    )
    assert failure(TensorReward()) == (
        "reward TensorReward 'bare' returned a Tensor; the contract is a RewardOutput with "
        "scores [N] = (2,)"
    )
    # inside RegionReward: named with the reward that holds it, not a torch.stack error
    scene = ColourSegmenter()
    with pytest.raises(RewardFailed) as err:
        Scorer([RegionReward([WrongShapeReward()])], scene)(batch["source"], batch)
    assert str(err.value) == (
        "reward WrongShapeReward 'wrong' (in RegionReward 'regions') returned scores of shape "
        "(2, 2); the contract is [N] = (2,), one score per edit"
    )
    with pytest.raises(RewardFailed, match=r"^reward RaisingReward 'judge' \(in RegionReward"):
        Scorer([RegionReward([RaisingReward()])], scene)(batch["source"], batch)


def test_a_raising_reward_ends_the_cli_in_one_line_and_the_run_failed(in_tmp, capsys):

    reward = '--model.init_args.rewards=[{"class_path": "test_failures.RaisingReward"}]'
    capsys.readouterr()
    assert main(["fit", "--config", GRPO, *TINY_GRPO, reward]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith(
        "lit_grpo fit: error: reward RaisingReward 'judge' raised RuntimeError: judge server "
        "unreachable (at test_failures.py:"
    )
    assert "Traceback" not in err
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-talk2move").experiment_id]
    )
    assert run.info.status == "FAILED"


def test_reward_means_are_float64_and_nonfinite_rewards_are_counted_not_averaged():
    n = 8
    huge = torch.full((n,), 3e38)  # finite in float32; their float32 sum is inf
    huge[::2] = float("nan")
    scores = Scores(huge, {"huge": huge}, {})
    log = step_statistics(scores, group_advantages(huge, 4))
    assert log["reward/total"].item() == pytest.approx(3e38, rel=1e-6)
    assert log["reward/huge"].item() == pytest.approx(3e38, rel=1e-6)
    assert log["reward/nonfinite_fraction"].item() == 0.5
    assert log["groups/dropped_samples"].item() == 4
    nan = torch.full((n,), float("nan"))
    log = step_statistics(Scores(nan, {"nan": nan}, {}), group_advantages(nan, 4))
    assert math.isnan(log["reward/total"].item())  # a mean over no value is NaN, never 0
    assert log["reward/nonfinite_fraction"].item() == 1.0


def test_iterations_in_a_row_count_by_cause_reset_and_stop_at_the_limit():
    streak = InARow(3, "trained nothing", "max_skipped_in_a_row", "Check it.")
    streak.update("cause A", 0, 0)
    streak.update(None, 1, 1)  # an iteration that trained resets the count
    streak.update("cause A", 2, 2)
    streak.update("cause B", 3, 3)
    assert streak.count == 2 and streak.state_dict() == {"causes": {"cause A": 1, "cause B": 1}}
    with pytest.raises(TrainingStalled) as err:
        streak.update("cause A", 4, 4)
    assert str(err.value) == (
        "GRPO trained nothing for 3 iterations in a row (iterations 2..4, global_step 4, "
        "model.init_args.max_skipped_in_a_row=3): cause A (2 of them); cause B (1 of them). "
        "Check it."
    )
    again = InARow(3, "trained nothing", "max_skipped_in_a_row", "Check it.")
    again.load_state_dict(streak.state_dict())
    assert again.count == 3


ADVICE = (
    "Look at a few scored rollouts (lit_grpo.callbacks.RolloutImageLogger): do the rewards "
    "and the segmenter work on this data?"
)


class FindsEverything(ColourSegmenter):
    """Reports the object found in every image (the untrained test policy draws blurs)."""

    def __call__(self, images, phrases):
        found = super().__call__(images, phrases)
        return replace(found, found=torch.ones_like(found.found))


@pytest.mark.parametrize(
    "reward,cause",
    [
        (NaNReward, "every reward was NaN or inf (reward/nonfinite_fraction 1)"),
        (ConstantReward, "no group had reward spread (groups/zero_spread_fraction 1)"),
    ],
    ids=["all-nan", "zero-spread"],
)
def test_a_grpo_run_that_trains_nothing_stops_naming_the_cause(reward, cause):
    module = tiny_module([reward()], max_skipped_in_a_row=3, segmenter=FindsEverything())
    with pytest.raises(TrainingStalled) as err:
        fit_steps(module, 10)
    assert str(err.value) == (
        "GRPO trained nothing for 3 iterations in a row (iterations 0..2, global_step 2, "
        f"model.init_args.max_skipped_in_a_row=3): {cause}. {ADVICE}"
    )
    assert module.iteration == 2  # stopped in its third iteration


def spatialflow(segmenter=None, **kw):
    """SpatialFlow-GRPO from the built-in SFT editor (it draws the objects it is asked to)."""
    torch.manual_seed(0)
    policy = TinyEditPolicy(weights="shapeworld-sft")
    return SpatialFlowGRPOModule(
        policy,
        [RegionReward([TranslationReward()])],
        segmenter=segmenter,
        lora=LoraSettings(rank=4, alpha=4),
        group_size=4,
        sample_steps=4,
        eval_steps=2,
        region_weights={"edit": 1.0},  # the shipped configs/spatialflow.yaml's
        **kw,
    )


def test_spatialflow_with_a_segmenter_that_finds_nothing_is_skipped_and_stops():
    # the same run with a working segmenter trains (the control)
    seen = Recorder("train/skipped", "groups/zero_spread_fraction", "reward/object_found")
    fit_steps(spatialflow(), 1, [seen], objects=(2, 3))
    assert seen.rows[0]["train/skipped"] == 0.0 and seen.rows[0]["reward/object_found"] > 0
    # a segmenter that finds nothing: the edit region is empty, its score flat; the other
    # regions' spread (background L1) trains nothing under region_weights [1, 0, 0]
    blind = ColourSegmenter(min_pixels=10**6)
    seen = Recorder("train/skipped", "groups/zero_spread_fraction", "reward/object_found")
    module = spatialflow(blind, max_skipped_in_a_row=2)
    with pytest.raises(TrainingStalled) as err:
        fit_steps(module, 10, [seen], objects=(2, 3))
    assert seen.rows == [
        {"train/skipped": 1.0, "groups/zero_spread_fraction": 1.0, "reward/object_found": 0.0}
    ]
    assert str(err.value) == (
        "GRPO trained nothing for 2 iterations in a row (iterations 0..1, global_step 1, "
        "model.init_args.max_skipped_in_a_row=2): no group had reward spread and the "
        "segmenter found the object in no edit (groups/zero_spread_fraction 1, "
        f"reward/object_found 0). {ADVICE}"
    )


def test_an_all_nan_fit_through_the_cli_exits_1_in_one_line_and_the_run_failed(in_tmp, capsys):

    capsys.readouterr()
    code = main(
        [
            "fit",
            "--config",
            GRPO,
            *TINY_GRPO,
            '--model.init_args.rewards=[{"class_path": "helpers.NaNReward"}]',
            "--model.init_args.max_skipped_in_a_row=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [x for x in err.splitlines() if "error:" in x] == [
        "lit_grpo fit: error: GRPO trained nothing for 2 iterations in a row (iterations 0..1, "
        "global_step 1, model.init_args.max_skipped_in_a_row=2): every reward was NaN or inf "
        f"(reward/nonfinite_fraction 1). {ADVICE}"
    ]
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-talk2move").experiment_id]
    )
    assert run.info.status == "FAILED"  # never FINISHED as if fine
    history = {
        key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("reward/total", "reward/nonfinite_fraction", "train/skipped")
    }
    assert math.isnan(history["reward/total"][0])  # NaN, not 0.0
    assert history["reward/nonfinite_fraction"] == [1.0] and history["train/skipped"] == [1.0]


def test_a_missing_jsonl_file_and_a_huge_resolution_are_one_line(in_tmp, capsys):
    jsonl = ["--data=lit_grpo.datamodules.JsonlDataModule", "--data.init_args.train=no.jsonl"]
    assert error_of(capsys, "fit", "--config", GRPO, *jsonl) == (
        f"lit_grpo fit: error: data.init_args.train: jsonl file not found: {in_tmp / 'no.jsonl'}"
    )
    assert error_of(capsys, "fit", "--config", GRPO, "--data.init_args.resolution=4096") == (
        "lit_grpo fit: error: ShapeWorldDataModule: resolution must be within 16..2048 px, got 4096 "
        "(lit_grpo.datamodules.shapeworld.MAX_RESOLUTION: no supported backbone edits above it)"
    )
    huge = "--data.init_args.resolution=[64, 4096]"
    assert error_of(capsys, "fit", "--config", GRPO, *jsonl, huge) == (
        "lit_grpo fit: error: data.init_args.resolution 64x4096: each side must be within "
        "1..2048 px (lit_grpo.datamodules.shapeworld.MAX_RESOLUTION: no supported backbone "
        "edits above it)"
    )
    assert not list(in_tmp.glob("runs/*"))


@pytest.mark.parametrize("overlay", ["fsdp", "ddp"])
def test_a_gpu_overlay_on_a_machine_without_gpu_says_how_to_run_on_the_cpu(
    overlay, in_tmp, capsys, monkeypatch
):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    path = ROOT / f"configs/strategy/{overlay}.yaml"
    assert error_of(capsys, "fit", "--config", GRPO, "--config", str(path)) == (
        f"lit_grpo fit: error: trainer.accelerator is 'gpu' (set by {path}), but this machine "
        "has no GPU that torch can use. Add --trainer.accelerator=cpu to run on the CPU (a "
        "strategy overlay's ranks then run as CPU processes over gloo), or run where a GPU is"
    )
    assert not list(in_tmp.glob("runs/*"))
