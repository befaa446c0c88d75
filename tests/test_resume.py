"""Exact resume (issue 14): a GRPO run stopped or killed after a checkpoint and resumed with
`ckpt_path` trains the same weights, bit for bit, as a run never stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import lora_params, quiet_trainer, store_client, tiny_data, tiny_module

from lit_grpo.callbacks import ModelCheckpoint
from lit_grpo.callbacks.checkpoint import AtomicCheckpointIO
from lit_grpo.datamodules.resumable import EpochSampler

ROOT = Path(__file__).resolve().parent.parent
# 8 training samples in batches of 2: 4 batches an epoch, so 6 steps cross an epoch boundary
STEPS = 6


def resumable_module():
    # minibatches=2: the update shuffles its rows, a draw the checkpoint must also hold
    return tiny_module(group_size=3, sample_steps=3, minibatches=2)


def resumable_data():
    return tiny_data(train_size=8)


def train(root: Path, steps: int, ckpt_path: str | None = None, callbacks=()) -> dict:
    """Fit the tiny GRPO module to `steps` (from `ckpt_path` if given); its LoRA weights."""
    module = resumable_module()
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    trainer = quiet_trainer(
        max_steps=steps,
        max_epochs=-1,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[checkpoint, *callbacks],
    )
    trainer.fit(module, resumable_data(), ckpt_path=ckpt_path)
    assert trainer.global_step == steps and module.iteration == steps
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # our ModelCheckpoint's
    return lora_params(module)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("whole"), STEPS)


def assert_bitwise_equal(resumed: dict, whole: dict) -> None:
    assert resumed.keys() == whole.keys() and whole
    differ = {n: (resumed[n] - whole[n]).abs().max().item() for n in whole}
    assert not any(differ.values()), f"max |difference| per tensor: {differ}"


@pytest.mark.parametrize("stop", [3, 4], ids=["mid-epoch", "epoch-end"])
def test_a_stopped_run_resumed_from_last_ckpt_trains_the_same_weights(
    tmp_path, uninterrupted, stop
):
    train(tmp_path, stop)
    resumed = train(tmp_path, STEPS, ckpt_path=str(tmp_path / "last.ckpt"))
    assert_bitwise_equal(resumed, uninterrupted)


class _Batches(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(tuple(batch["instruction"]))


def test_the_data_order_resumes_mid_epoch_without_repeating_or_skipping_a_batch(tmp_path):
    whole, first, second = _Batches(), _Batches(), _Batches()
    train(tmp_path / "whole", 5, callbacks=[whole])
    train(tmp_path, 3, callbacks=[first])
    train(tmp_path, 5, ckpt_path=str(tmp_path / "last.ckpt"), callbacks=[second])
    assert first.seen + second.seen == whole.seen
    assert len(set(whole.seen[:4])) == 4  # one epoch: every sample once


def test_epoch_order_depends_on_seed_and_epoch_only():
    order = EpochSampler(10, seed=3)
    first = list(order)
    order.set_epoch(1)
    assert list(order) != first and sorted(order) == list(range(10))
    order.set_epoch(0)
    assert list(order) == first == list(EpochSampler(10, seed=3))
    order.skip = 4
    assert list(order) == first[4:] and list(order) == first  # a skip applies to one pass
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})  # as the test process: another count sums in another order
from lit_grpo.callbacks import ModelCheckpoint
from lit_grpo.callbacks.checkpoint import AtomicCheckpointIO
from helpers import quiet_trainer
from test_resume import resumable_data, resumable_module

class KilledAfterSaving(ModelCheckpoint):
    def on_train_batch_end(self, trainer, *args):
        super().on_train_batch_end(trainer, *args)
        if trainer.global_step == {kill_at}:  # the checkpoint of this step is on disk
            os.kill(os.getpid(), signal.SIGKILL)

checkpoint = KilledAfterSaving(dirpath={root!r}, save_last=True, every_n_train_steps={kill_at})
trainer = quiet_trainer(max_steps={steps}, max_epochs=-1, enable_checkpointing=True,
                        default_root_dir={root!r}, callbacks=[checkpoint])
trainer.fit(resumable_module(), resumable_data())
print("NOT KILLED")
"""


@pytest.mark.slow
def test_a_run_killed_with_sigkill_after_a_checkpoint_resumes_exactly(tmp_path, uninterrupted):
    code = KILLED_RUN.format(
        tests=str(ROOT / "tests"),
        root=str(tmp_path),
        kill_at=3,
        steps=STEPS,
        threads=torch.get_num_threads(),
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert "NOT KILLED" not in out.stdout
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    resumed = train(tmp_path, STEPS, ckpt_path=str(tmp_path / "last.ckpt"))
    assert_bitwise_equal(resumed, uninterrupted)


class Interrupted(AtomicCheckpointIO):
    """Writes half of the checkpoint, then dies (as a kill or a full disk would stop it)."""

    def write(self, checkpoint, file):
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt


def test_a_checkpoint_write_interrupted_midway_leaves_the_previous_one_whole(tmp_path):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "state_dict": {}}, last)
    before = last.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        Interrupted().save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(99)}}, last)
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, tmp_path / "new" / "x.ckpt")
    assert torch.load(tmp_path / "new" / "x.ckpt", weights_only=True) == {"global_step": 5}


def test_sigint_finishes_the_step_saves_last_ckpt_and_stops(tmp_path):
    from helpers import PlainModule, SignalAt, plain_loader

    from lit_grpo.callbacks import StopOnSignal

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    stop = StopOnSignal()
    trainer = quiet_trainer(
        max_steps=50,
        max_epochs=-1,
        default_root_dir=tmp_path,
        callbacks=[stop, SignalAt(step=2, signum=signal.SIGINT)],
    )
    trainer.fit(PlainModule(), plain_loader(8))  # no KeyboardInterrupt reaches the caller
    assert trainer.global_step == 2 and stop.received == signal.SIGINT
    assert stop.exit_code == 130
    saved = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handed back as it was


def test_sigterm_to_a_grpo_fit_saves_last_ckpt_exits_143_and_marks_the_run_killed(in_tmp):
    from test_cli import GRPO_TINY

    callback = '{"class_path": "helpers.SignalAt", "init_args": {"step": 2, "signum": 15}}'
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
    args = ["fit", "--config", str(ROOT / "configs/talk2move.yaml"), *GRPO_TINY]
    args += ["--trainer.max_steps=50", "--trainer.val_check_interval=50"]
    out = subprocess.run(
        [sys.executable, "-m", "lit_grpo", *args, f"--trainer.callbacks+={callback}"],
        cwd=in_tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "SIGTERM: stopped after step 2" in out.stderr
    (last,) = (in_tmp / "runs").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-talk2move").experiment_id]
    )
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "reward/total")) == 2
    # resumed: one history, every (key, step) once, the last step logged at its own number
    from lit_grpo.cli import run_cli

    resume = [*args[:-2], "--trainer.max_steps=4", "--trainer.val_check_interval=50"]
    run_cli([*resume, "--ckpt_path=last"])
    assert _history(in_tmp / "mlruns")[0] == []
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "reward/total")]
    assert sorted(steps) == [0, 1, 2, 3]


def test_ckpt_path_last_finds_the_newest_last_ckpt_of_the_experiment_or_says_none(in_tmp, capsys):
    from test_cli import TINY
    from test_user_errors import SFT, error_of

    from lit_grpo.cli import run_cli

    line = error_of(capsys, "fit", "--config", SFT, "--ckpt_path=last")
    assert "--ckpt_path last: no run of experiment 'shapeworld-sft' under runs" in line
    run_cli(["fit", "--config", SFT, *TINY, "--trainer.max_steps=2"])
    (first,) = (in_tmp / "runs").rglob("last.ckpt")
    assert first.parent.name == "checkpoints"  # runs/<experiment id>/<run id>/checkpoints
    cli = run_cli(["fit", "--config", SFT, *TINY, "--trainer.max_steps=3", "--ckpt_path=last"])
    assert cli.trainer.ckpt_path == str(first) and cli.trainer.global_step == 3
    # another experiment's checkpoints are not its own
    line = error_of(
        capsys,
        "fit",
        "--config",
        SFT,
        "--trainer.logger.init_args.experiment_name=elsewhere",
        "--ckpt_path=last",
    )
    assert "no run of experiment 'elsewhere'" in line


def test_a_resumed_fit_continues_its_mlflow_run(in_tmp):
    from test_cli import TINY
    from test_user_errors import SFT

    from lit_grpo.cli import run_cli

    first = run_cli(["fit", "--config", SFT, *TINY, "--trainer.max_steps=2"])
    run_id = first.trainer.logger.run_id
    (last,) = (in_tmp / "runs").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["mlflow_run_id"] == run_id
    resumed = run_cli(
        ["fit", "--config", SFT, *TINY, "--trainer.max_steps=4", f"--ckpt_path={last}"]
    )
    assert resumed.trainer.logger.run_id == run_id
    client = store_client(in_tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("shapeworld-sft").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [0, 1, 2, 3]  # one history, no step twice or missing
    assert run.data.params["trainer.max_steps"] == "2"  # a parameter keeps its first value
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "config.resumed.yaml"} <= artifacts


def test_the_command_line_wins_over_the_checkpoints_hyper_parameters(in_tmp):
    from test_cli import TINY
    from test_user_errors import SFT

    from lit_grpo.cli import run_cli

    run_cli(["fit", "--config", SFT, *TINY, "--trainer.max_steps=1"])  # TINY: sample_steps=2
    test = ["test", "--config", SFT, *TINY, "--trainer.limit_test_batches=1", "--ckpt_path=last"]
    cli = run_cli([*test, "--model.init_args.sample_steps=3"])
    assert cli.model.hparams.sample_steps == 3


SLOW_STEP_RUN = """
import sys
import time
sys.path.insert(0, {tests!r})
import lightning as L
from helpers import LoggingModule, SignalAt, SleepAt, plain_loader
from lit_grpo.callbacks import ModelCheckpoint, StopOnSignal
from lit_grpo.loggers import MLflowLogger

logger = MLflowLogger(experiment_name="slow", tracking_uri="sqlite:///{root}/mlflow.db")
trainer = L.Trainer(
    max_steps=50, max_epochs=-1, logger=logger, log_every_n_steps=1, limit_val_batches=0,
    enable_progress_bar=False, enable_model_summary=False, default_root_dir={root!r},
    callbacks=[
        StopOnSignal(deadline={deadline}),
        ModelCheckpoint(dirpath={root!r}, save_last=True, every_n_train_steps=1),
        *[SignalAt(step=3, signum={signum})] * {send},
        SleepAt(step=3, seconds=600),  # step 3 would take 10 minutes
    ],
)
trainer.fit(LoggingModule(), plain_loader(8))
print("NOT STOPPED")
"""


def _slow_step_run(root: Path, deadline: float, signum: int, send: int) -> subprocess.Popen:
    code = SLOW_STEP_RUN.format(
        tests=str(ROOT / "tests"), root=str(root), deadline=deadline, signum=signum, send=send
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _communicate(run: subprocess.Popen) -> tuple[bytes, bytes]:
    try:
        return run.communicate(timeout=120)
    finally:
        run.kill()  # a run that did not stop does not outlive the test


def _assert_killed_at_step_2(root: Path, stderr: str) -> None:
    import mlflow

    assert "Traceback" not in stderr
    saved = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2  # the checkpoint before the slow step, whole
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("slow").experiment_id])
    assert run.info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [
        0,
        1,
    ]


def test_a_step_that_overruns_the_stop_deadline_is_cut_short(tmp_path):
    """SIGTERM as step 3 starts, a step of 10 minutes, a deadline of 2 s: exit 143 two
    seconds after the signal, the run KILLED, the checkpoint of step 2 whole."""
    run = _slow_step_run(tmp_path, deadline=2, signum=signal.SIGTERM, send=1)
    assert run.stdout.readline() == b"sleeping\n"  # the signal is on its way
    start = time.monotonic()
    _, err = _communicate(run)
    waited = time.monotonic() - start
    assert run.returncode == 143, err.decode()[-2000:]
    assert 1.5 < waited < 30, waited
    line = (
        "SIGTERM: the run did not stop within 2 s (StopOnSignal deadline): stopped at once "
        "after step 2, losing the work since the last checkpoint; resume with --ckpt_path"
    )
    assert line in err.decode().splitlines()
    _assert_killed_at_step_2(tmp_path, err.decode())


def test_a_second_signal_stops_at_once(tmp_path):
    """Ctrl+C as step 3 (10 minutes long) starts, then Ctrl+C again from outside: exit 130
    at once, long before the deadline of 10 minutes."""
    run = _slow_step_run(tmp_path, deadline=600, signum=signal.SIGINT, send=1)
    assert run.stdout.readline() == b"sleeping\n"
    time.sleep(0.5)  # the first Ctrl+C (sent by the run to itself) has been handled
    start = time.monotonic()
    run.send_signal(signal.SIGINT)
    _, err = _communicate(run)
    assert run.returncode == 130, err.decode()[-2000:]
    assert time.monotonic() - start < 30
    line = (
        "SIGINT: a second signal: stopped at once after step 2, losing the work since the "
        "last checkpoint; resume with --ckpt_path"
    )
    assert line in err.decode().splitlines()
    _assert_killed_at_step_2(tmp_path, err.decode())


def _fit_logged(root: Path, steps: int, ckpt_path=None, run_id=None, callbacks=()) -> str:
    """A plain module fitted to `steps` (4 batches an epoch, validation every 2 steps),
    logging to a sqlite MLflow store in `root`; the run's id."""
    from helpers import LoggingModule, plain_loader

    from lit_grpo.loggers import MLflowLogger

    uri = f"sqlite:///{root}/mlflow.db"
    logger = MLflowLogger(experiment_name="history", tracking_uri=uri, run_id=run_id)
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[
            ModelCheckpoint(dirpath=root, save_last=True, save_top_k=1, monitor="val/loss"),
            *callbacks,
        ],
    )
    trainer.fit(LoggingModule(), plain_loader(4), plain_loader(1), ckpt_path=ckpt_path)
    return logger.run_id


def _history(root: Path) -> tuple[list, list]:
    """(every (key, step) logged twice, the steps of train/loss) of the store in `root`."""
    import sqlite3

    with sqlite3.connect(root / "mlflow.db") as db:
        twice = db.execute(
            "SELECT key, step FROM metrics GROUP BY run_uuid, key, step HAVING COUNT(*) > 1"
        ).fetchall()
        steps = db.execute("SELECT step FROM metrics WHERE key = 'train/loss' ORDER BY step")
        return twice, [s for (s,) in steps]


@pytest.mark.parametrize(
    "stop",
    ["SIGTERM mid-epoch", "SIGTERM at a validation", "max_time mid-epoch", "max_time epoch end"],
)
def test_a_stopped_and_resumed_run_logs_no_step_twice(tmp_path, stop):
    """The MLflow history of a run stopped (by a signal, or `trainer.should_stop` as
    `max_time` sets it) and resumed from its `last.ckpt` is the history of a run never
    stopped: every (key, step) once, `train/loss` at steps 0..7."""
    from helpers import SignalAt, StopAt

    from lit_grpo.callbacks import StopOnSignal

    how, when = stop.split(" ", 1)
    step = {"mid-epoch": 3, "at a validation": 2, "epoch end": 4}[when]
    stopper = [StopOnSignal(), SignalAt(step=step)] if how == "SIGTERM" else [StopAt(step)]
    run_id = _fit_logged(tmp_path, 8, callbacks=stopper)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == step
    assert _fit_logged(tmp_path, 8, str(tmp_path / "last.ckpt"), run_id) == run_id
    assert _history(tmp_path) == ([], list(range(8)))


KILLED_AT_VALIDATION = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import lightning as L
from test_resume import _fit_logged

class KilledAfterLogging(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 3:  # step 3 is logged, its checkpoint (at step 4) not written
            os.kill(os.getpid(), signal.SIGKILL)

_fit_logged(Path({root!r}), 8, callbacks=[KilledAfterLogging()])
"""


def test_a_run_killed_after_a_checkpoint_and_resumed_logs_no_step_twice(tmp_path):
    import mlflow

    code = KILLED_AT_VALIDATION.format(tests=str(ROOT / "tests"), root=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("history").experiment_id])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
    first = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(first) == [0, 1, 2]  # step 3 (at 2) was logged before the kill
    _fit_logged(tmp_path, 8, str(tmp_path / "last.ckpt"), run.info.run_id)
    assert _history(tmp_path) == ([], list(range(8)))  # step 3, trained again, is not logged
    again = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert again[2] == first[2]
