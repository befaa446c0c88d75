"""Rewards as a service (issue 25 items 1, 2): `serve-rewards` scores exactly as the trainer
would, and a `RemoteReward` turns every server fault into NaN rollouts and, N in a row, one
line. Loopback only; every server is stopped by the test that starts it."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import store_client
from safetensors.torch import save
from test_failures import TINY_GRPO
from test_user_errors import error_of

from lit_grpo import __version__
from lit_grpo.__main__ import main
from lit_grpo.cli import run_cli
from lit_grpo.datamodules.shapeworld import ShapeWorld
from lit_grpo.rewards import (
    BackgroundReward,
    RegionReward,
    RemoteReward,
    Reward,
    RewardOutput,
    Scorer,
    TranslationReward,
)
from lit_grpo.rewards.base import RewardFailed
from lit_grpo.rewards.server import RewardService, listening_socket, serving

ROOT = Path(__file__).resolve().parent.parent
GRPO = str(ROOT / "configs/talk2move.yaml")
SERVE = str(ROOT / "configs/rewards/serve_spatial.yaml")
FAST = {"timeout": 0.5, "retries": 1, "backoff": 0.05, "max_failures": 2}


def edits(n=4, group=3, seed=0):
    """A batch of n ShapeWorld conditions and n * group noisy edits of their targets."""
    data = ShapeWorld("val", 8, 32, ("translate", "rotate", "scale"), seed=0)
    batch = torch.utils.data.default_collate([data[i] for i in range(n)])
    g = torch.Generator().manual_seed(seed)
    images = batch["target"].repeat_interleave(group, 0)
    images = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images, batch


def spatial():
    return [TranslationReward(), BackgroundReward(weight=0.5)]


@contextmanager
def serve_rewards_process(config=SERVE):
    """`python -m lit_grpo serve-rewards` on a free port of 127.0.0.1: (its URL, process)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lit_grpo", "serve-rewards", "--config", config, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = proc.stdout.readline()  # the server's first line, once it listens
        assert " on http://127.0.0.1:" in line, line + proc.stdout.read()
        yield line.split(" on ")[1].split()[0], proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


class Flaky(RewardService):
    """Scores the first `good` batches, then answers `reply` (status, body)."""

    def __init__(self, reply, good=1):
        super().__init__(Scorer(spatial()))
        self.reply, self.good = reply, good

    def score(self, body):
        if self.batches < self.good:
            return super().score(body)
        return self.reply


def test_served_scores_equal_the_in_process_scores_bit_for_bit():
    images, batch = edits()
    for rewards in (spatial, lambda: [RegionReward([TranslationReward()])]):
        want = Scorer(rewards())(images, batch, 3)
        with serving(RewardService(Scorer(rewards()))) as url:
            remote = RemoteReward(url)
            got = Scorer([remote])(images, batch, 3)
            assert torch.equal(got.total, want.total)
            for key, value in want.parts.items():
                assert torch.equal(got.parts[key], value), key
            assert torch.equal(got.parts["remote_failures"], torch.zeros(12))
            for out in want.regions.values():  # it stands in for the RegionReward
                served = got.regions["remote"]
                assert served.region_names == out.region_names
                assert torch.equal(served.regions, out.regions)
                assert torch.equal(served.region_masks, out.region_masks)
            # the server's segmenter finds the objects itself: the same scores
            alone = Scorer([RemoteReward(url, detections=False)])(images, batch, 3)
            assert torch.equal(alone.total, want.total)
            # uint8 pixels: the edits and sources rounded to 8 bits (the trainer's detections)
            eight = Scorer([RemoteReward(url, pixels="uint8")])(images, batch, 3)
            local = Scorer(rewards())
            inputs = local.observe(images, batch, 3)
            inputs.images, inputs.source = (
                (x * 255).round() / 255 for x in (images, inputs.source)
            )
            assert torch.equal(eight.total, local.judge(inputs).total)
            assert not torch.equal(eight.total, want.total)
            health = remote.health()
            assert health["status"] == "ok" and health["lit_grpo"] == __version__
            assert health["batches"] == 3 and health["rows"] == 36


def test_a_grpo_fit_through_serve_rewards_trains_exactly_as_in_process(in_tmp):
    """The fit of configs/talk2move.yaml scored by `serve-rewards` (same rewards, served from
    another process) trains the same LoRA weights, bit for bit: every score was the same."""
    args = ["--config", GRPO, *TINY_GRPO, "--trainer.max_steps=2"]
    initial = dict(run_cli(args, run=False).model.named_parameters())
    with serve_rewards_process() as (url, _):  # starts while the in-process fit runs
        local = dict(run_cli(["fit", *args]).model.named_parameters())
        remote = (
            f'[{{"class_path": "lit_grpo.rewards.RemoteReward", "init_args": {{"url": "{url}"}}}}]'
        )
        cli = run_cli(["fit", *args, f"--model.init_args.rewards={remote}"])
        served = RemoteReward(url).health()
    reward = cli.model.rewards[0]
    assert isinstance(reward, RemoteReward) and reward.scored >= 2
    assert served["batches"] == reward.scored  # every batch, training and validation
    trained = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    assert trained and cli.trainer.global_step == 2
    assert any(not torch.equal(p, initial[n]) for n, p in trained.items())  # it trained
    for name, p in trained.items():
        assert torch.equal(p, local[name]), name


def test_the_serving_configs_parse():
    overlay = str(ROOT / "configs/rewards/remote.yaml")
    cli = run_cli(["--config", GRPO, "--config", overlay, *TINY_GRPO], run=False)
    (reward,) = cli.model.rewards
    assert isinstance(reward, RemoteReward) and reward.url == "http://127.0.0.1:8765"
    from lit_grpo.commands.serve_rewards import parser

    for config in sorted((ROOT / "configs/rewards").glob("serve_*.yaml")):
        p = parser()
        built = p.instantiate_classes(p.parse_args(["--config", str(config)]))
        assert built.rewards and all(isinstance(r, Reward) for r in built.rewards), config


def test_a_server_killed_mid_run_gives_nan_rollouts_then_stops_the_run(caplog):
    images, batch = edits()
    with serve_rewards_process() as (url, proc):
        reward = RemoteReward(url, **FAST)
        scorer = Scorer([reward])
        assert torch.isfinite(scorer(images, batch, 3).total).all()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, "lit_grpo.rewards.remote"):
            scores = scorer(images, batch, 3)
        assert time.perf_counter() - start < 5  # connection refused: no waiting on timeouts
        assert torch.isnan(scores.total).all() and torch.equal(
            scores.parts["remote_failures"], torch.ones(12)
        )
        (warning,) = [r.getMessage() for r in caplog.records]
        assert warning.startswith(
            f"RemoteReward: no scores from {url} for 12 rollouts (cannot connect ("
        )
        assert warning.endswith(
            "; 2 tries): they count as NaN (1 of max_failures=2 batches in a row)"
        )
        with pytest.raises(RewardFailed) as err:
            scorer(images, batch, 3)
    message = str(err.value)
    assert message.startswith(
        f"RemoteReward: the reward server at {url} gave no scores for 2 batches in a row "
        "(max_failures=2; last: cannot connect ("
    )
    assert "\n" not in message


def test_a_server_killed_mid_fit_ends_the_cli_in_one_line_naming_the_url(in_tmp, capsys):
    """The server dies after scoring 2 batches: the next batch trains nothing (NaN), the one
    after stops the run with exit 1 and one line; the MLflow run is FAILED."""

    with serve_rewards_process() as (url, proc):

        def kill_after_two_batches():
            for _ in range(600):  # bounded: at most 60 s
                try:
                    if RemoteReward(url).health()["batches"] >= 2:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_after_two_batches, daemon=True)
        killer.start()
        args = ", ".join(f'"{k}": {v}' for k, v in FAST.items())
        remote = f'[{{"class_path": "lit_grpo.rewards.RemoteReward", "init_args": {{"url": "{url}", {args}}}}}]'
        capsys.readouterr()
        code = main(
            ["fit", "--config", GRPO, *TINY_GRPO, "--trainer.max_steps=8"]
            + [f"--model.init_args.rewards={remote}"]
        )
        killer.join(timeout=60)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith(
        f"lit_grpo fit: error: RemoteReward: the reward server at {url} gave no scores for 2 "
        "batches in a row (max_failures=2; last: "
    )
    client = store_client(in_tmp)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-talk2move").experiment_id]
    )
    assert run.info.status == "FAILED"
    failures = client.get_metric_history(run.info.run_id, "reward/remote_failures")
    assert [m.value for m in failures][-1] == 1.0  # the NaN batch is in the log


class SlowReward(TranslationReward):
    """Answers its first batch at once, every later one after `seconds`."""

    def __init__(self, seconds=3.0):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, inputs):
        self.calls += 1
        if self.calls > 1:
            time.sleep(self.seconds)
        return super().forward(inputs)


def test_a_server_slower_than_the_timeout_gives_nan_in_bounded_time(caplog):
    images, batch = edits()
    with serving(RewardService(Scorer([SlowReward()]))) as url:
        scorer = Scorer([RemoteReward(url, **FAST)])
        assert torch.isfinite(scorer(images, batch, 3).total).all()
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, "lit_grpo.rewards.remote"):
            scores = scorer(images, batch, 3)
        waited = time.perf_counter() - start
        assert torch.isnan(scores.total).all()
        assert 1.0 <= waited < 2.5  # 2 tries of 0.5 s and a 0.05 s back-off, not 3 s sleeps
        (warning,) = [r.getMessage() for r in caplog.records]
        assert warning == (
            f"RemoteReward: no scores from {url} for 12 rollouts (no answer within "
            "timeout=0.5 s; 2 tries): they count as NaN (1 of max_failures=2 batches in a row)"
        )


def test_a_malformed_answer_gives_nan_and_a_good_batch_resets_the_count(caplog):
    images, batch = edits()
    wrong_shape = save(
        {"total": torch.zeros(13)}, metadata={"protocol": "1", "lit_grpo": __version__}
    )
    for reply, cause in [
        (
            (200, b"<html>proxy error</html>"),
            "the reply is not a safetensors body (24 bytes: b'<html>proxy error</html>')",
        ),
        ((200, wrong_shape), "the reply has total of shape (13,), not [N] = (12,)"),
        ((502, {"error": "bad gateway"}), "HTTP 502: bad gateway; 2 tries"),
    ]:
        service = Flaky(reply)
        with serving(service) as url:
            reward = RemoteReward(url, **FAST)
            scorer = Scorer([reward])
            assert torch.isfinite(scorer(images, batch, 3).total).all()
            caplog.clear()
            with caplog.at_level(logging.WARNING, "lit_grpo.rewards.remote"):
                assert torch.isnan(scorer(images, batch, 3).total).all()
            (warning,) = [r.getMessage() for r in caplog.records]
            assert f"for 12 rollouts ({cause})" in warning, warning
            service.good = 10  # the server recovers: scores again, the count starts over
            assert torch.isfinite(scorer(images, batch, 3).total).all()
            assert reward.failures_in_a_row == 0


def test_a_server_of_another_version_or_none_at_all_stops_at_once_in_one_line():
    images, batch = edits()
    service = RewardService(Scorer(spatial()))
    service.versions = {"protocol": "1", "lit_grpo": "0.0.9"}
    with serving(service) as url:
        with pytest.raises(RewardFailed) as err:
            Scorer([RemoteReward(url, **FAST)])(images, batch, 3)
        health = RemoteReward(url).health()
    assert str(err.value) == (
        f"RemoteReward {url}: the server refused the batch (HTTP 409): the reward server "
        f"speaks protocol 1 of lit_grpo 0.0.9, the trainer protocol 1 of lit_grpo {__version__}; "
        "serve the rewards with the trainer's lit_grpo version"
    )
    assert health["lit_grpo"] == "0.0.9" and health["batches"] == 0
    # a server that does not check, answering as another version: refused by the trainer
    reply = Flaky((200, b""), good=0)
    with serving(reply) as url:
        theirs = {"protocol": "2", "lit_grpo": __version__}
        reply.reply = (200, save({"total": torch.zeros(12)}, metadata=theirs))
        with pytest.raises(RewardFailed, match="speaks protocol 2 of lit_grpo"):
            Scorer([RemoteReward(url, **FAST)])(images, batch, 3)
    # nothing listening: the first batch stops the run (a wrong url, a server not started)
    sock = listening_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(RewardFailed) as err:
        Scorer([RemoteReward(url, **FAST)])(images, batch, 3)
    assert str(err.value).startswith(f"RemoteReward: no scores from the reward server at {url} (")
    assert str(err.value).endswith(
        "; 2 tries); start it (python -m lit_grpo serve-rewards --config REWARDS.yaml --port N) "
        "or fix the reward's url"
    )


class BrokenReward(Reward):
    name = "broken"

    def forward(self, inputs):
        return RewardOutput(torch.zeros(2))


def test_a_broken_served_reward_is_named_by_the_trainer_in_one_line():
    images, batch = edits()
    with serving(RewardService(Scorer([BrokenReward()]))) as url:
        with pytest.raises(RewardFailed) as err:
            Scorer([RemoteReward(url, **FAST)])(images, batch, 3)
    assert str(err.value) == (
        f"RemoteReward {url}: the server refused the batch (HTTP 422): reward BrokenReward "
        "'broken' returned scores of shape (2,); the contract is [N] = (12,), one score per edit"
    )


def test_serve_rewards_command_errors_and_help_are_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["serve-rewards", "--help"])
    assert "serve rewards over HTTP" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert error_of(capsys, "serve-rewards", "--config", SERVE, "--device", "cuda") == (
            "lit_grpo serve-rewards: error: device cuda: this machine has no CUDA GPU; use "
            "--device cpu"
        )
    taken = listening_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        line = error_of(capsys, "serve-rewards", "--config", SERVE, "--port", str(port))
    finally:
        taken.close()
    assert (
        line
        == f"lit_grpo serve-rewards: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    with pytest.raises(ValueError, match="url must start with http"):
        RemoteReward("127.0.0.1:8765")


def test_the_top_level_help_names_serve_rewards():
    out = subprocess.run(
        [sys.executable, "-m", "lit_grpo", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert "serve-rewards" in out.stdout and "RemoteReward" in out.stdout
