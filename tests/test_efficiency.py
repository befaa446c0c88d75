"""benchmarks/efficiency.py: the summary's arithmetic on given numbers, and the four generated
fit configs (what each changes, and that the CLI parses them)."""

import math
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from efficiency import (  # noqa: E402
    METHODS,
    REFERENCE,
    REWARDS,
    first_reaching,
    fit_config,
    per_step_seconds,
    summary,
)

from lit_grpo.cli import run_cli  # noqa: E402


def point(step, seconds, reward, rewards=(0.0, 0.0)):
    return {"step": step, "seconds": seconds, "reward": reward, "reward_ci": 0.01,
            "rewards": list(rewards)}  # fmt: skip


def test_first_reaching_is_the_earliest_point_at_or_above_the_target():
    points = [(90.0, 0.93), (30.0, 0.92), (60.0, 0.93), (0.0, 0.80)]  # out of time order
    assert first_reaching(points, 0.93) == 60.0  # equal counts; 90 s is later
    assert first_reaching(points, 0.925) == 60.0
    assert first_reaching(points, 0.92) == 30.0
    assert first_reaching(points, 0.80) == 0.0
    assert first_reaching(points, 0.94) is None
    assert first_reaching([], 0.5) is None


def test_summary_on_given_numbers():
    runs = {
        REFERENCE: [point(0, 0.0, 0.80), point(100, 150.0, 0.95), point(200, 300.0, 0.93, (0.90, 0.96))],
        "fast": [point(0, 0.0, 0.80), point(10, 30.0, 0.92), point(20, 60.0, 0.94, (0.92, 0.96)),
                 point(30, 90.0, 0.99)],
        "slow": [point(0, 0.0, 0.80), point(10, 200.0, 0.90), point(20, 400.0, 0.929)],
    }  # fmt: skip
    s = summary(runs)
    assert (s["target"], s["target_step"], s["target_seconds"]) == (0.93, 200, 300.0)
    ref, fast, slow = (s["methods"][k] for k in (REFERENCE, "fast", "slow"))
    # the reference's own curve passes its last value at step 100, half its seconds
    assert (ref["seconds"], ref["step"], ref["ratio"]) == (150.0, 100, 0.5)
    assert (fast["seconds"], fast["step"], fast["ratio"]) == (60.0, 20, 0.2)
    assert fast["trained_seconds"] == 90.0
    # paired on the same two edits: differences 0.02 and 0.00 -> mean 0.01, sd 0.02 / sqrt 2
    mean, half = fast["difference"]
    assert mean == pytest.approx(0.01)
    assert half == pytest.approx(1.96 * (0.02 / math.sqrt(2)) / math.sqrt(2))
    assert (slow["seconds"], slow["step"], slow["ratio"], slow["difference"]) == (None,) * 4
    assert slow["trained_seconds"] == 400.0


def test_per_step_seconds_leaves_out_the_first_checkpoint():
    points = [point(0, 0.0, 0.8), point(10, 25.0, 0.8), point(20, 45.0, 0.8), point(30, 65.0, 0.8)]
    assert per_step_seconds(points) == 2.0  # (65 - 25) / (30 - 10)
    assert math.isnan(per_step_seconds(points[:2]))


@pytest.mark.parametrize("name", list(METHODS))
def test_generated_config_parses_with_the_common_rewards(name, tmp_path, capsys):
    cfg = fit_config(METHODS[name], tmp_path, seed=3, max_steps=200, seconds=3725, every=10)
    init = cfg["model"]["init_args"]
    assert init["rewards"] == REWARDS
    assert (init["group_size"], cfg["data"]["init_args"]["batch_size"]) == (8, 4)
    assert cfg["data"]["init_args"]["tasks"] == ["translate"]
    assert init["policy"]["init_args"]["weights"] == "shapeworld-sft"
    assert cfg["seed_everything"] == 3
    trainer = cfg["trainer"]
    assert (trainer["max_steps"], trainer["max_time"]) == (200, "00:01:02:05")
    assert (trainer["limit_val_batches"], trainer["num_sanity_val_steps"]) == (0, 0)
    ckpt = trainer["callbacks"][-1]["init_args"]
    assert (ckpt["every_n_train_steps"], ckpt["save_top_k"]) == (10, -1)
    assert ckpt["dirpath"] == str(tmp_path / "checkpoints")
    strategy = {
        REFERENCE: "lit_grpo.sampling.strategies.FullTrajectory",
        "flow-grpo-early-exit": "lit_grpo.sampling.strategies.EarlyExit",
        "neighbor-grpo-ode": "lit_grpo.sampling.strategies.ODETrajectory",
        "diffusion-nft": "lit_grpo.sampling.strategies.ODETrajectory",
    }[name]
    assert init["strategy"]["class_path"] == strategy
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    rewards = printed["model"]["init_args"]["rewards"]
    assert [r["class_path"] for r in rewards] == [r["class_path"] for r in REWARDS]
