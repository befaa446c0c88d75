"""The CLI as a user meets it: configs, an end-to-end fit, errors on bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_clip, store_client

from lit_grpo.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# A few steps of a 20k-parameter editor at 16 px: the whole fit takes seconds on 2 cores.
TINY = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.policy.init_args.width=32",
    "--model.init_args.policy.init_args.depth=1",
    "--model.init_args.policy.init_args.heads=2",
    "--model.init_args.warmup_steps=1",
    "--model.init_args.sample_steps=2",
    "--model.init_args.grid_size=2",
    "--data.init_args.resolution=16",
    "--data.init_args.batch_size=4",
    "--data.init_args.val_size=4",
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "${" not in printed  # interpolations resolved


def test_fit_end_to_end_changes_weights_and_logs_to_mlflow(in_tmp):

    args = ["--config", str(ROOT / "configs/sft.yaml"), *TINY]
    before = run_cli(args, run=False).model  # same seed, same config: the initial weights
    again = run_cli(args, run=False).model
    assert all(
        torch.equal(a, b) for a, b in zip(before.state_dict().values(), again.state_dict().values())
    )
    cli = run_cli(["fit", *args])
    initial = dict(before.named_parameters())
    trained = dict(cli.model.named_parameters())
    unchanged = [
        n
        for n, p in trained.items()
        if p.requires_grad and torch.equal(p.detach(), initial[n].detach())
    ]
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"

    client = store_client(in_tmp)
    exp = client.get_experiment_by_name("shapeworld-sft")
    (run,) = client.search_runs([exp.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 4 and all(m.value > 0 for m in losses)
    assert client.get_metric_history(run.info.run_id, "val/loss")
    # the edit metrics of validation, per task of the validation batch
    val_tasks = {k.split("/")[1] for k in run.data.metrics if k.endswith("/accuracy")}
    assert val_tasks and val_tasks <= {"translate", "rotate", "scale"}
    for task in val_tasks:
        assert {f"val/{task}/found", f"val/{task}/background_l1"} <= set(run.data.metrics)
    assert run.data.params["model.policy.width"] == "32"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "images" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("val_edits" in p for p in images), images  # the validation grid
    ckpts = list((in_tmp / "runs").rglob("last.ckpt"))
    assert len(ckpts) == 1
    # The checkpoint carries a self-describing policy another stage can start from.
    from lit_grpo.policies.weights import load_policy

    policy = load_policy(str(ckpts[0]))
    assert torch.equal(
        policy.state_dict()["transformer.proj_out.weight"],
        cli.model.policy.state_dict()["transformer.proj_out.weight"],
    )


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "lit_grpo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_config_typo_names_the_key(in_tmp):
    out = _cli(
        "fit", "--config", str(ROOT / "configs/sft.yaml"), "--model.init_args.lrr=1", cwd=in_tmp
    )
    assert out.returncode != 0
    assert "lrr" in out.stderr and "Traceback" not in out.stderr


def test_missing_checkpoint_and_weights_are_named(in_tmp):
    out = _cli(
        "fit", "--config", str(ROOT / "configs/sft.yaml"), "--ckpt_path=gone.ckpt", cwd=in_tmp
    )
    assert out.returncode == 2
    assert "gone.ckpt" in out.stderr and "--ckpt_path" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli(
        "fit",
        "--config",
        str(ROOT / "configs/sft.yaml"),
        *TINY,
        "--model.init_args.policy.init_args.weights=missing.safetensors",
        cwd=in_tmp,
    )
    assert out.returncode == 2
    assert "missing.safetensors" in out.stderr and "weights: null" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_metric_weights_are_named_before_anything_is_built(in_tmp):
    def metrics(**kw):
        return "--model.init_args.metrics=" + json.dumps(
            {"class_path": "lit_grpo.metrics.EditMetrics", "init_args": kw}
        )

    lpips = {"class_path": "lit_grpo.metrics.LPIPS", "init_args": {"weights": "no_alex.pth"}}
    clip = {
        "class_path": "lit_grpo.metrics.CLIPScore",
        "init_args": {"model": "ViT-B-32", "pretrained": "no_clip.bin"},
    }
    for arg, name in ((metrics(lpips=lpips), "no_alex.pth"), (metrics(clip=clip), "no_clip.bin")):
        out = _cli("test", "--config", str(ROOT / "configs/talk2move.yaml"), arg, cwd=in_tmp)
        assert out.returncode == 2, out.stderr[-500:]
        assert name in out.stderr and "never downloads" in out.stderr
        assert "Traceback" not in out.stderr


def test_unwritable_output_directory_is_reported_before_training(in_tmp):
    (in_tmp / "afile").write_text("a file, not a directory")
    out = _cli(
        "fit",
        "--config",
        str(ROOT / "configs/sft.yaml"),
        *TINY,
        f"--trainer.default_root_dir={in_tmp / 'afile' / 'runs'}",
        cwd=in_tmp,
    )
    assert out.returncode == 2
    assert "cannot write the output directory" in out.stderr and "afile" in out.stderr
    assert not (in_tmp / "mlruns").exists() or not list((in_tmp / "runs").rglob("*.ckpt"))


def test_top_level_help_lists_commands_without_lightning():
    code = (
        "import sys; from lit_grpo.__main__ import main; main(['--help']); "
        "print('LIGHTNING_LOADED' if 'lightning' in sys.modules else 'LIGHT')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "fit" in out.stdout and "validate" in out.stdout and "LIGHT\n" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lit_grpo", "fitt"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'fitt'" in bad.stderr


GRPO_TINY = [
    "--trainer.enable_progress_bar=false",  # the config's PhaseProgressBar is then dropped
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.group_size=3",
    "--model.init_args.sample_steps=5",  # early-exit configs exit at 4: 4 SDE steps + 1
    "--model.init_args.eval_steps=2",
    "--data.init_args.resolution=16",
    "--data.init_args.batch_size=2",
    "--data.init_args.val_size=2",
]


def test_grpo_fit_through_cli_trains_lora_from_builtin_sft(in_tmp):

    cli = run_cli(["fit", "--config", str(ROOT / "configs/talk2move.yaml"), *GRPO_TINY])
    lora = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    fresh = run_cli(["--config", str(ROOT / "configs/talk2move.yaml"), *GRPO_TINY], run=False)
    initial = dict(fresh.model.named_parameters())
    assert lora and all(not torch.equal(p.detach(), initial[n].detach()) for n, p in lora.items())
    client = store_client(in_tmp)
    exp = client.get_experiment_by_name("shapeworld-talk2move")
    (run,) = client.search_runs([exp.experiment_id])
    metrics = run.data.metrics
    for key in (
        "reward/total",
        "reward/translation",
        "reward/background",
        "adv/std",
        "groups/zero_spread_fraction",
        "train/clip_fraction",
        "time/sampling",
        "time/rewards",
        "time/update",
        "val/reward",
        "val/translate/accuracy",
        "val/translate/distance",
        "val/translate/background_l1",
    ):
        assert key in metrics, key
    assert len(client.get_metric_history(run.info.run_id, "reward/total")) == 2
    # the config's RolloutImageLogger and LoraExporter: a rollout grid, an adapter per save
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("rollouts" in p for p in images), images
    assert any("val_edits" in p for p in images), images  # the validation grid
    assert list((in_tmp / "runs").rglob("lora/lora-step=*.safetensors"))


@pytest.mark.parametrize("task", ["rotate", "scale"])
def test_per_task_configs_train_their_own_reward(in_tmp, task):

    config = ROOT / f"configs/talk2move_{task}.yaml"
    run_cli(["fit", "--config", str(config), *GRPO_TINY])
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(f"shapeworld-talk2move-{task}").experiment_id]
    )
    reward = {"rotate": "rotation", "scale": "scale"}[task]
    for key in (f"reward/{reward}", "reward/background", f"val/{task}/found", "train/loss"):
        assert key in run.data.metrics, key


def test_unified_config_trains_one_policy_on_all_three_edits(in_tmp):

    config = ROOT / "configs/talk2move_unified.yaml"
    cli = run_cli(
        [
            "fit",
            "--config",
            str(config),
            *GRPO_TINY,
            "--data.init_args.val_size=12",
            "--trainer.limit_val_batches=6",
        ]
    )
    assert cli.datamodule.hparams.tasks == ["translate", "rotate", "scale"]
    client = store_client(in_tmp)
    exp = client.get_experiment_by_name("shapeworld-talk2move-unified")
    (run,) = client.search_runs([exp.experiment_id])
    metrics = run.data.metrics
    for key in ("reward/translation", "reward/rotation", "reward/scale", "reward/background"):
        assert key in metrics, key
    for task in ("translate", "rotate", "scale"):  # validation covers every task
        assert f"val/{task}/found" in metrics, task


def test_spatialflow_main_job_leaves_a_checkpoint_and_lora_that_test_and_edit_accept(
    in_tmp, capsys
):
    from PIL import Image

    from lit_grpo.__main__ import main
    from lit_grpo.datamodules.shapeworld import ShapeWorld

    config = str(ROOT / "configs/spatialflow.yaml")
    # 3 steps: the main job mixes three tasks, a step whose groups have no spread (a rotate
    # group in which nothing turns) trains nothing, and LoRA's A matrices move only from the
    # second step that trains (B starts at zero); at seed 0 one of the first two is such a step
    steps = [
        *(a for a in GRPO_TINY if not a.startswith("--trainer.max_steps")),
        "--trainer.max_steps=3",
    ]
    cli = run_cli(["fit", "--config", config, *steps])
    assert cli.datamodule.hparams.tasks == ["translate", "rotate", "scale"]
    fresh = run_cli(["--config", config, *steps], run=False)
    initial = dict(fresh.model.named_parameters())
    lora = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    assert lora and all(not torch.equal(p.detach(), initial[n].detach()) for n, p in lora.items())
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-spatialflow").experiment_id]
    )
    for key in ("reward/regions", "reward/region_edit", "reward/others_l1", "train/loss"):
        assert key in run.data.metrics, key
    # the shipped KL on the other objects and the background: the second step's adapter is
    # off the reference, so its region KL is positive
    kl = client.get_metric_history(run.info.run_id, "train/kl")
    assert cli.model.objective.kl_region_weights == {"edit": 0.0, "others": 1.0, "background": 1.0}
    assert max(m.value for m in kl) > 0
    assert list((in_tmp / "runs").rglob("lora/lora-step=*.safetensors"))
    (last,) = (in_tmp / "runs").rglob("last.ckpt")
    test_args = ["test", "--config", config, *steps, f"--ckpt_path={last}"]
    run_cli([*test_args, "--trainer.limit_test_batches=1"])
    assert "Talk2Move table" in capsys.readouterr().out
    sample = ShapeWorld("test", 1, 16, ("translate",), objects=(2, 3))[0]
    image = in_tmp / "in.png"
    Image.fromarray((sample["source"].permute(1, 2, 0) * 255).byte().numpy()).save(image)
    out = in_tmp / "out.png"
    edit = ["edit", "--ckpt", str(last), "--image", str(image), "--out", str(out)]
    assert main([*edit, "--instruction", sample["instruction"]]) == 0 and out.exists()


def test_last_checkpoint_holds_the_final_step_when_stopped_between_validations(in_tmp):
    args = ["--config", str(ROOT / "configs/sft.yaml"), *TINY, "--trainer.max_steps=3"]
    run_cli(["fit", *args])  # validation (and a save) at step 2, the stop at step 3
    (last,) = (in_tmp / "runs").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3


def test_mlflow_logger_honours_the_tracking_uri_env(in_tmp, monkeypatch):
    from lit_grpo.loggers import MLflowLogger

    uri = f"sqlite:///{in_tmp}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    logger = MLflowLogger(experiment_name="env-check")
    assert logger._tracking_uri == uri
    logger.log_metrics({"x": 1.0}, step=0)
    assert (in_tmp / "elsewhere.db").exists() and not (in_tmp / "mlruns").exists()


def test_artifacts_go_beside_the_store_named_by_the_env(in_tmp, monkeypatch):
    store = in_tmp / "store"
    store.mkdir()
    work = in_tmp / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/elsewhere.db")
    run_cli(["fit", "--config", str(ROOT / "configs/sft.yaml"), *TINY, "--trainer.max_steps=1"])
    assert list(work.iterdir()) == [work / "runs"]  # no mlruns/ in the working directory
    (config,) = store.rglob("config.yaml")
    assert config.is_relative_to(store / "artifacts")


def test_validate_and_test_subcommands_from_a_checkpoint(in_tmp, capsys):

    run_cli(["fit", "--config", str(ROOT / "configs/sft.yaml"), *TINY, "--trainer.max_steps=2"])
    (last,) = (in_tmp / "runs").rglob("last.ckpt")
    cli = run_cli(
        [
            "test",
            "--config",
            str(ROOT / "configs/sft.yaml"),
            *TINY,
            "--trainer.limit_test_batches=1",
            f"--ckpt_path={last}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert "test/loss" in metrics
    # Talk2Move's table: printed, logged per task, stored with the run
    printed = capsys.readouterr().out
    assert "Talk2Move table: 4 test edits" in printed
    header = next(line for line in printed.splitlines() if line.startswith("task "))
    assert "accuracy" in header and "bg L1" in header
    tasks = {k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2}
    assert tasks and tasks <= {"translate", "rotate", "scale"}
    for task in tasks:
        assert re.search(rf"^{task}\s+\d+\s", printed, re.M), printed
        assert f"test/{task}/accuracy" in metrics and f"test/{task}/background_l1" in metrics
    client = store_client(in_tmp)
    run = client.get_run(cli.trainer.logger.run_id)
    table = client.download_artifacts(run.info.run_id, "test_edits.txt", str(in_tmp))
    assert open(table).read().splitlines()[0] == header


def test_config_params_name_list_items_by_class_not_position():
    from lit_grpo.cli import _flatten

    bar = {"class_path": "lit_grpo.callbacks.PhaseProgressBar", "init_args": {"leave": False}}
    ckpt = {"class_path": "lit_grpo.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    full = _flatten({"trainer": {"callbacks": [bar, ckpt]}, "model": {"init_args": {"lr": 1}}})
    fewer = _flatten({"trainer": {"callbacks": [ckpt]}, "model": {"init_args": {"lr": 1}}})
    assert full["trainer.callbacks.ModelCheckpoint.save_last"] is True
    assert full["trainer.callbacks.PhaseProgressBar.leave"] is False
    assert full["model.lr"] == 1
    # dropping the bar leaves the checkpoint's parameters under the same names
    assert {k: v for k, v in full.items() if "PhaseProgressBar" not in k} == fewer
    twice = _flatten({"callbacks": [ckpt, ckpt]})
    assert set(twice) >= {"callbacks.ModelCheckpoint[0]", "callbacks.ModelCheckpoint[1].save_last"}


@pytest.mark.parametrize(
    "config,experiment",
    [("rcgrpo.yaml", "shapeworld-rcgrpo"), ("rcgrpo_sde.yaml", "shapeworld-rcgrpo-sde")],
)
def test_rcgrpo_configs_train_lora_with_the_attention_reward(in_tmp, config, experiment):

    args = ["--config", str(ROOT / "configs" / config), *GRPO_TINY]
    if config == "rcgrpo.yaml":
        args.append("--model.init_args.anchors=2")  # of G = 3
    cli = run_cli(["fit", *args])
    initial = dict(run_cli(args, run=False).model.named_parameters())
    lora = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    assert lora and all(not torch.equal(p.detach(), initial[n].detach()) for n, p in lora.items())
    client = store_client(in_tmp)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    for key in (
        "reward/attention_concentration",
        "reward/background",
        "reward/translation",
        "train/loss",
        "val/attention_concentration",
        "val/translate/accuracy",
    ):
        assert key in run.data.metrics, key


def test_instructrl4pix_config_trains_lora_on_the_attention_map_and_clip_rewards(in_tmp):
    model, weights, _ = save_tiny_clip(in_tmp, "tiny-clip.json")  # random, in local files

    def rewards(pretrained):  # the paper's pair: the config's comment shows the same entry
        clip = {"model": str(model), "pretrained": str(pretrained), "weight": 1.0}
        return "--model.init_args.rewards=" + json.dumps(
            [
                {"class_path": "lit_grpo.rewards.AttentionMapReward"},
                {"class_path": "lit_grpo.rewards.CLIPReward", "init_args": clip},
            ]
        )

    config = str(ROOT / "configs/instructrl4pix.yaml")
    args = ["--config", config, *GRPO_TINY, rewards(weights)]
    cli = run_cli(["fit", *args])
    initial = dict(run_cli(args, run=False).model.named_parameters())
    lora = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    assert lora and all(not torch.equal(p.detach(), initial[n].detach()) for n, p in lora.items())
    assert not any("judge" in k or "clip" in k for k in cli.model.state_dict())  # not saved
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-instructrl4pix").experiment_id]
    )
    for key in (
        "reward/attention_map",
        "reward/clip",
        "adv/std",
        "train/loss",
        "train/clip_fraction",
        "val/attention_map",
        "val/clip",
        "val/translate/accuracy",
    ):
        assert key in run.data.metrics, key
    # two minibatches: the second is trained off-policy, so PPO's ratio moves off 1
    assert run.data.metrics["train/approx_kl"] > 0
    # a missing CLIP file is named by the up-front check, before anything is built (the
    # command line turns it into exit code 2, as test_missing_metric_weights_... shows)
    with pytest.raises(FileNotFoundError, match="no_clip.bin.*never downloads") as err:
        run_cli(["fit", "--config", config, *GRPO_TINY, rewards(in_tmp / "no_clip.bin")])
    assert any(entry.name == "before_instantiate_classes" for entry in err.traceback)


def test_run_names_follow_the_command_line(in_tmp, capsys):
    """`run_name: spatialflow-G${model.init_args.group_size}` resolves with the group size the
    run uses, not the YAML's; a run name set on the command line stays as given."""

    from lit_grpo.__main__ import main

    spatialflow = ["--config", str(ROOT / "configs/spatialflow.yaml")]
    name = lambda cli: cli.config.trainer.logger.init_args.run_name  # noqa: E731
    assert name(run_cli(spatialflow, run=False)) == "spatialflow-G8"
    assert name(run_cli([*spatialflow, "--model.init_args.group_size=4"], run=False)) == (
        "spatialflow-G4"
    )
    mine = ["--model.init_args.group_size=4", "--trainer.logger.init_args.run_name=mine"]
    assert name(run_cli([*spatialflow, *mine], run=False)) == "mine"
    # sft.yaml: run_name: sft-${data.init_args.resolution}px; TINY trains at 16 px
    run_cli(["fit", "--config", str(ROOT / "configs/sft.yaml"), *TINY, "--trainer.max_steps=1"])
    client = store_client(in_tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("shapeworld-sft").experiment_id])
    assert run.info.run_name == "sft-16px"
    assert run.data.params["trainer.logger.run_name"] == "sft-16px"
    capsys.readouterr()
    assert main(["compare", "--experiment", "shapeworld-sft", "--no-plot"]) == 0
    assert "sft-16px" in capsys.readouterr().out
