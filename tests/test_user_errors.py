"""Hostile input gets one clear message: exit code 2, one line naming the file or key and
what to do, no traceback (issue 14)."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from lit_grpo.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
SFT, GRPO = str(ROOT / "configs/sft.yaml"), str(ROOT / "configs/talk2move.yaml")


def error_of(capsys, *args) -> str:
    """Run the CLI in-process; it must refuse with exit code 2 and one line on stderr."""
    capsys.readouterr()
    assert main(list(args)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "config,arg,message",
    [
        (GRPO, "--model.init_args.group_size=0", "GRPOModule: group_size must be >= 2"),
        (GRPO, "--model.init_args.group_size=1", "group_size must be >= 2 for group advantages"),
        (SFT, "--data.init_args.batch_size=0", "ShapeWorldDataModule: batch_size must be >= 1"),
        (SFT, "--trainer.max_steps=0", "trainer.max_steps is 0: the fit would train nothing"),
        (
            GRPO,
            "--model.init_args.strategy.init_args.exit_step=20",
            "exit_step 20 is past the schedule of sample_steps=10",
        ),
        (
            GRPO,
            "--model.init_args.policy.init_args.width=32",
            "shapeworld_sft.safetensors was trained with another architecture (width: file 128 "
            "vs config 32)",
        ),
    ],
    ids=["group_size=0", "group_size=1", "batch_size=0", "max_steps=0", "exit_step", "weights"],
)
def test_bad_arguments_are_refused_in_one_line(in_tmp, capsys, config, arg, message):
    assert message in error_of(capsys, "fit", "--config", config, arg)
    assert not list(in_tmp.glob("runs/*"))  # refused before a run folder or checkpoint


def test_exit_step_past_the_schedule_is_refused_by_the_module():
    from helpers import tiny_module

    from lit_grpo.sampling.strategies import EarlyExit

    with pytest.raises(ValueError, match="exit_step 20 is past .* sample_steps=10"):
        tiny_module(strategy=EarlyExit(exit_step=20), sample_steps=10)
    tiny_module(strategy=EarlyExit(exit_step=9), sample_steps=10)  # the last step is fine


def fake_checkpoint(path: Path, module: str) -> Path:
    """What LightningCLI stores of a stage: its class path among the hyper-parameters."""
    torch.save({"hyper_parameters": {"_class_path": f"lit_grpo.modules.{module}"}}, path)
    return path


def test_unreadable_checkpoints_are_named_without_weights_only_advice(in_tmp, capsys):
    good = fake_checkpoint(in_tmp / "good.ckpt", "SFTModule").read_bytes()
    (in_tmp / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (in_tmp / "corrupt.ckpt").write_bytes(b"\x80\x04not a pickle at all")
    for name in ("truncated.ckpt", "corrupt.ckpt"):
        line = error_of(capsys, "fit", "--config", SFT, f"--ckpt_path={name}")
        assert f"checkpoint (--ckpt_path) {name} is not a readable checkpoint" in line
        assert "weights_only" not in line
    # the same file given to export or edit
    line = error_of(capsys, "export", "truncated.ckpt", "out.safetensors")
    assert "truncated.ckpt is not a readable checkpoint" in line


def test_a_checkpoint_of_the_other_stage_is_refused_by_name(in_tmp, capsys):
    sft = fake_checkpoint(in_tmp / "sft.ckpt", "SFTModule")
    grpo = fake_checkpoint(in_tmp / "grpo.ckpt", "GRPOModule")
    line = error_of(capsys, "fit", "--config", GRPO, f"--ckpt_path={sft}")
    assert "this checkpoint was written by SFTModule; this config trains GRPOModule" in line
    assert f"policy.init_args.weights={sft}" in line  # how to start GRPO from it instead
    line = error_of(capsys, "fit", "--config", SFT, f"--ckpt_path={grpo}")
    assert "this checkpoint was written by GRPOModule; this config trains SFTModule" in line


def test_a_checkpoint_of_another_policy_architecture_is_refused(in_tmp, capsys):
    """Same stage, another policy: one line naming what differs, not load_state_dict's list
    of tensor shapes."""
    path = in_tmp / "wide.ckpt"
    torch.save(
        {
            "hyper_parameters": {"_class_path": "lit_grpo.modules.GRPOModule"},
            "lit_grpo_policy": {
                "class": "TinyEditPolicy",
                "config": {"width": 64, "depth": 4, "heads": 4, "patch_size": 4},
            },
        },
        path,
    )
    line = error_of(capsys, "fit", "--config", GRPO, f"--ckpt_path={path}")
    assert (
        "was trained with another policy architecture (width: checkpoint 64 vs config 128)" in line
    )
    torch.save(
        {
            "hyper_parameters": {"_class_path": "lit_grpo.modules.GRPOModule"},
            "lit_grpo_policy": {"class": "OtherPolicy", "config": {}},
        },
        path,
    )
    line = error_of(capsys, "fit", "--config", GRPO, f"--ckpt_path={path}")
    assert "holds a OtherPolicy policy; this config builds a TinyEditPolicy" in line


def test_config_typo_in_an_interpolation_and_non_utf8_config_name_the_file(in_tmp, capsys):
    text = Path(GRPO).read_text()
    assert "${model.init_args.group_size}" in text
    typo = in_tmp / "typo.yaml"
    typo.write_text(text.replace("${model.init_args.group_size}", "${model.init_args.group_sise}"))
    line = error_of(capsys, "fit", "--config", str(typo))
    assert f"config file {typo}: ${{model.init_args.group_sise}} names no key" in line
    latin = in_tmp / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\n" + Path(SFT).read_bytes())
    line = error_of(capsys, "fit", "--config", str(latin))
    assert f"config file {latin} is not UTF-8 text (byte 0xe9 on line 1)" in line


@pytest.fixture
def png(tmp_path):
    """A 45x30 px image: neither square nor a multiple of the editor's 4 px patch."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), np.uint8)).save(path)
    return path


def test_edit_refuses_bad_instruction_size_and_device(png, tmp_path, capsys):
    out = tmp_path / "out.png"
    edit = ["edit", "--image", str(png), "--out", str(out)]
    move = [*edit, "--instruction", "move the red circle left"]
    line = error_of(capsys, *edit, "--instruction", "move the \udcff circle")  # bytes, not UTF-8
    assert "--instruction 'move the \\udcff circle' is not UTF-8 text" in line
    with pytest.raises(SystemExit) as exit_:
        main([*edit, "--instruction", " \t "])
    assert exit_.value.code == 2 and "--instruction is empty" in capsys.readouterr().err
    # refused at once (it used to run for hours), with the limit stated
    line = error_of(capsys, *move, "--size", "2048")
    assert "cannot edit at 2048x2048 px (--size): edit's limit is 512 px a side" in line
    line = error_of(capsys, *move, "--size", "45x30")
    assert "cannot edit a 45x30 px image" in line and "multiples of the patch size 4" in line
    for device in ("foo", "meta"):
        assert f"--device {device!r} is not a device edit can use" in error_of(
            capsys, *move, "--device", device
        )
    if not torch.cuda.is_available():
        assert "no cuda device is available here" in error_of(capsys, *move, "--device", "cuda")
    assert not out.exists()
    # an odd-sized input is resized to the resolution the built-in editor was trained at
    assert main(move) == 0
    assert "resized to 32x32 px" in capsys.readouterr().out and out.exists()


def test_export_names_an_output_folder_it_cannot_create(tmp_path, capsys):
    (tmp_path / "afile").write_text("a file, not a folder")
    line = error_of(capsys, "export", "shapeworld-sft", str(tmp_path / "afile/x.safetensors"))
    assert f"cannot write the output directory (OUT) at {tmp_path / 'afile'}" in line
    assert main(["export", "shapeworld-sft", str(tmp_path / "new/x.safetensors")]) == 0
    assert (tmp_path / "new/x.safetensors").is_file()  # a missing folder is created


def test_export_overwrites_an_existing_file_only_with_force(tmp_path, capsys):
    out = tmp_path / "editor.safetensors"
    out.write_bytes(b"an earlier export")
    for extra in ([], ["--lora-diffusers"]):
        line = error_of(capsys, "export", "shapeworld-sft", str(out), *extra)
        assert line == f"lit_grpo export: error: {out} exists; pass --force to overwrite it"
    assert out.read_bytes() == b"an earlier export"  # as `expand` words it, and refuses
    assert main(["export", "shapeworld-sft", str(out), "--force"]) == 0
    assert "wrote TinyEditPolicy" in capsys.readouterr().out and out.stat().st_size > 1000
    with pytest.raises(SystemExit):  # an argparse error, exit 2
        main(["export", str(out), str(out), "--force"])
    assert "OUT must not be the checkpoint it exports" in capsys.readouterr().err


def _start_logger(root: str, barrier, results) -> None:
    from lit_grpo.loggers import MLflowLogger

    barrier.wait()  # both processes create the store at the same moment
    try:
        logger = MLflowLogger(experiment_name="together", root=root)
        results.put(("ok", logger.experiment.get_run(logger.run_id).info.run_id))
    except Exception as err:  # reported to the test, not lost in the child
        results.put(("error", f"{type(err).__name__}: {err}"[:300]))


def test_two_runs_starting_together_on_a_fresh_mlflow_store_both_live(tmp_path, monkeypatch):
    """MLflow creates a sqlite store's tables without a lock: one of two runs starting
    together used to die with `duplicate column name: step`, its run lost."""
    import multiprocessing

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the children import this checkout
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_start_logger, args=(str(tmp_path), barrier, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [status for status, _ in outcomes] == ["ok", "ok"], outcomes
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "together"]
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == {run_id for _, run_id in outcomes}


NOISE = (
    "litlogger",  # Lightning's advert
    "LeafSpec",  # torch's deprecation, raised inside Lightning's _pytree.py
    "in eval mode at the start of training",  # our frozen judges, on purpose
    "FLOPs",  # a count nothing measured: Total FLOPs: 0
    "WeightAveraging",  # "may run out of memory" unsharded; "loading ... outside 'fit'"
    "dirpath has changed",  # validate / test log to a new run: another folder, always
    "Epoch 0/-",  # Lightning's rich bar on a max_steps run: Epoch 0/-2
)


def test_a_normal_fit_prints_only_what_matters_and_its_checkpoint_keeps_its_stage(in_tmp, capsys):
    import subprocess
    import sys

    from test_cli import TINY

    code = f"from lit_grpo.cli import run_cli; run_cli(['fit', '--config', {SFT!r}, *{TINY!r}])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, not the editable install's
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=in_tmp, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout + out.stderr
    assert "Total params" in printed and "max_steps=4` reached" in printed  # still said
    assert [n for n in NOISE if n in printed] == [], printed
    # the SFT checkpoint of that run, given to the GRPO config, is refused by name
    (last,) = in_tmp.rglob("last.ckpt")
    line = error_of(capsys, "fit", "--config", GRPO, f"--ckpt_path={last}")
    assert "this checkpoint was written by SFTModule; this config trains GRPOModule" in line


def test_the_cli_silences_exactly_the_eval_mode_warning_of_a_grpo_fit():
    """A GRPO fit's frozen reward judges are in eval mode on purpose; other warnings stay."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    from lit_grpo.cli import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        for message in (
            "Found 2 module(s) in eval mode at the start of training.",
            "Found 2 modules that did something else",
        ):
            warnings.warn(message, PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Found 2 modules that did something else"]


def test_a_checkpoint_of_another_task_or_experiment_is_refused(in_tmp, capsys):
    """`fit --config talk2move_rotate.yaml --ckpt_path <a talk2move last.ckpt>` would append
    rotate training to the translate run's MLflow history: refused in one line."""
    from test_cli import GRPO_TINY

    configs = Path(__file__).resolve().parent.parent / "configs"
    tiny = [*GRPO_TINY, "--trainer.max_steps=1"]
    translate = ["fit", "--config", str(configs / "talk2move.yaml"), *tiny]
    assert main(translate) == 0
    (last,) = in_tmp.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["mlflow_experiment"] == "shapeworld-talk2move"
    rotate = ["fit", "--config", str(configs / "talk2move_rotate.yaml"), *tiny]
    line = error_of(capsys, *rotate, f"--ckpt_path={last}")
    assert line == (
        f"lit_grpo fit: error: checkpoint (--ckpt_path) {last} was trained for another run "
        "(tasks ['translate'] vs this config's ['rotate']; experiment 'shapeworld-talk2move' "
        "vs this config's 'shapeworld-talk2move-rotate'): resuming would append this "
        "training to that run. Resume with a checkpoint of this config's runs (--ckpt_path "
        "last), or start from its weights with --model.init_args.policy.init_args.weights="
        f"{last} and no --ckpt_path"
    )
    # the same task under another experiment name is another run too
    renamed = "--trainer.logger.init_args.experiment_name=elsewhere"
    line = error_of(capsys, *translate, renamed, f"--ckpt_path={last}")
    assert "(experiment 'shapeworld-talk2move' vs this config's 'elsewhere')" in line
