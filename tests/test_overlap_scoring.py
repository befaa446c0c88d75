"""Scoring overlapped with sampling (issue 25 item 3): the rewards of one chunk of conditions
run in a worker thread while the next chunk samples, and nothing the policy learns changes."""

import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import shapeworld_batch, tiny_module
from test_failures import TINY_GRPO, RaisingReward
from test_user_errors import error_of

from lit_grpo.__main__ import main
from lit_grpo.checks import ConfigError
from lit_grpo.cli import run_cli
from lit_grpo.modules.chunked_scoring import chunk_sizes, condition_chunks, sample_and_score
from lit_grpo.modules.phases import PhaseClock
from lit_grpo.rewards import RewardOutput, TranslationReward
from lit_grpo.rewards.base import RewardFailed
from lit_grpo.rewards.scoring import Scores

ROOT = Path(__file__).resolve().parent.parent
GRPO = str(ROOT / "configs/talk2move.yaml")
CHUNKED = ["--trainer.max_steps=2", "--model.init_args.score_chunk=1"]


class WatchingReward(TranslationReward):
    """TranslationReward that notes the thread it runs in and how many velocity calls the
    policy made while it scored (it takes `seconds` to score)."""

    def __init__(self, policy=None, seconds=0.0):
        super().__init__()
        self.policy, self.seconds, self.seen = policy, seconds, []

    def forward(self, inputs):
        calls = self.policy.calls if self.policy is not None else 0
        time.sleep(self.seconds)
        after = self.policy.calls if self.policy is not None else 0
        self.seen.append((threading.current_thread().name, after - calls))
        return super().forward(inputs)


def counting(policy):
    """Count the policy's velocity calls (from any thread)."""
    policy.calls, velocity = 0, policy.velocity

    def counted(*args, **kwargs):
        policy.calls += 1
        return velocity(*args, **kwargs)

    policy.velocity = counted
    return policy


def rollouts(module, batch, chunk, overlap):
    module._generator = torch.Generator().manual_seed(7)
    clock = PhaseClock(torch.device("cpu"))
    record, scores = sample_and_score(module, batch, chunk, overlap, clock)
    return record, scores, clock.seconds()


def test_a_fit_with_overlapped_scoring_trains_exactly_as_the_serial_chunks(in_tmp):
    """configs/talk2move.yaml for 2 steps, 2 conditions a batch, one per chunk: scoring in the
    worker thread trains the same LoRA weights, bit for bit, as scoring in turn."""
    args = ["--config", GRPO, *TINY_GRPO, *CHUNKED]
    initial = dict(run_cli(args, run=False).model.named_parameters())
    serial = dict(run_cli(["fit", *args]).model.named_parameters())
    cli = run_cli(["fit", *args, "--model.init_args.overlap_scoring=true"])
    trained = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    assert trained and cli.trainer.global_step == 2
    assert any(not torch.equal(p, initial[n]) for n, p in trained.items())  # it trained
    for name, p in trained.items():
        assert torch.equal(p, serial[name]), name
    # the chunk sizes as a YAML list reach the chunker: [1] is one condition at a time
    listed = run_cli(["fit", *args, "--model.init_args.score_chunk=[1]"]).model
    assert listed.hparams.score_chunk == [1]
    for name, p in listed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, serial[name]), name
    logged = cli.trainer.logged_metrics
    assert logged["time/rewards"] >= 0 and logged["time/sampling"] > 0


def test_the_rewards_of_a_chunk_run_in_the_worker_while_the_next_chunk_samples():
    module = tiny_module([TranslationReward()], score_chunk=1, overlap_scoring=True)
    counting(module.policy)
    watcher = WatchingReward(module.policy, seconds=0.3)
    module.scorer.rewards[0] = watcher
    batch = shapeworld_batch(3)
    record, scores, _ = rollouts(module, batch, 1, overlap=True)
    threads = [name for name, _ in watcher.seen]
    assert len(threads) == 3 and all(t.startswith("lit_grpo-rewards") for t in threads)
    assert watcher.seen[0][1] > 0  # chunk 2 sampled while chunk 1 was scored
    watcher.seen.clear()
    serial_record, serial_scores, _ = rollouts(module, batch, 1, overlap=False)
    assert [n for n, _ in watcher.seen] == [threading.current_thread().name] * 3
    assert all(calls == 0 for _, calls in watcher.seen)  # in turn: nothing ran meanwhile
    assert len(record) == 12 and torch.equal(record.images, serial_record.images)
    assert torch.equal(record.log_prob_elements, serial_record.log_prob_elements)
    assert torch.equal(record.condition.text, serial_record.condition.text)
    assert torch.equal(scores.total, serial_scores.total) and scores.parts.keys() == {
        *serial_scores.parts
    }
    # one chunk of all conditions is the unchunked step: the same draws, the same rollouts
    whole, _, _ = rollouts(module, batch, None, overlap=False)
    module._generator = torch.Generator().manual_seed(7)
    assert torch.equal(whole.images, module.sample(batch).images)


class NotingReward(TranslationReward):
    """TranslationReward that notes the per-thread torch state it runs under."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, inputs):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return super().forward(inputs)


def test_the_worker_scores_under_the_training_thread_s_autocast_and_no_grad():
    """Autocast and grad mode are per thread in torch: the worker takes the training
    thread's (the Trainer's bf16-mixed autocast wraps training_step), as serial scoring does."""
    module = tiny_module([NotingReward()], score_chunk=1, overlap_scoring=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollouts(module, shapeworld_batch(2), 1, overlap=True)
    assert module.scorer.rewards[0].seen == [(True, False)] * 2
    module.scorer.rewards[0].seen.clear()
    rollouts(module, shapeworld_batch(2), 1, overlap=True)
    assert module.scorer.rewards[0].seen == [(False, False)] * 2


def test_a_reward_error_in_the_worker_is_the_serial_path_s_one_line():
    batch = shapeworld_batch(2)
    messages = []
    for overlap in (False, True):
        module = tiny_module([RaisingReward()], score_chunk=1, overlap_scoring=overlap)
        with pytest.raises(RewardFailed) as err:
            rollouts(module, batch, 1, overlap)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[1].startswith("reward RaisingReward 'judge' raised RuntimeError: judge ")
    assert not any(t.name.startswith("lit_grpo-rewards") for t in threading.enumerate())


def test_a_raising_reward_ends_an_overlapped_fit_in_one_line(in_tmp, capsys):
    reward = '--model.init_args.rewards=[{"class_path": "test_failures.RaisingReward"}]'
    overlap = "--model.init_args.overlap_scoring=true"
    capsys.readouterr()
    assert main(["fit", "--config", GRPO, *TINY_GRPO, *CHUNKED, overlap, reward]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith(
        "lit_grpo fit: error: reward RaisingReward 'judge' raised RuntimeError: judge server "
        "unreachable (at test_failures.py:"
    )
    assert "Traceback" not in err


def test_overlap_without_chunks_is_refused_in_one_line(in_tmp, capsys):
    overlap = "--model.init_args.overlap_scoring=true"
    assert error_of(capsys, "fit", "--config", GRPO, overlap).endswith(
        "overlap_scoring needs score_chunk: the conditions sampled while the previous ones are "
        "scored (e.g. model.init_args.score_chunk: 1)"
    )
    for bad in (0, [], [2, 0]):
        with pytest.raises(ValueError, match="score_chunk must be >= 1"):
            tiny_module([TranslationReward()], score_chunk=bad)


def test_a_policy_that_pads_its_conditions_per_chunk_is_refused_in_one_line():
    module = tiny_module([TranslationReward()], score_chunk=1)
    encode = module.policy.encode_condition

    def ragged(source, instructions, keys=None):  # text padded per chunk, as Qwen's is
        cond = encode(source, instructions, keys)
        extra = module.policy.calls = getattr(module.policy, "calls", 0) + 1  # 1, 2, ...
        text = torch.nn.functional.pad(cond.text, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(cond.text_mask, (0, extra))
        return type(cond)(text, mask, cond.image)

    module.policy.encode_condition = ragged
    with pytest.raises(ConfigError) as err:
        rollouts(module, shapeworld_batch(2), 1, overlap=False)
    l_tokens, width = encode(shapeworld_batch(1)["source"], ["x"]).text.shape[1:]  # fixed length
    assert str(err.value) == (
        f"score_chunk: TinyEditPolicy encodes chunk 2's condition.text as "
        f"({l_tokens + 2}, {width}) per row, chunk 1's as ({l_tokens + 1}, {width}) (it pads "
        "per batch); leave score_chunk unset with this policy"
    )


def test_listed_chunk_sizes_shrink_and_their_last_size_repeats():
    assert chunk_sizes(8, [4, 2, 1, 1]) == [4, 2, 1, 1]
    assert chunk_sizes(10, [4, 2, 1]) == [4, 2, 1, 1, 1, 1]  # the last size repeats
    assert chunk_sizes(5, [4, 2]) == [4, 1]  # the last chunk is what is left
    assert chunk_sizes(2, [4, 2]) == [2]
    assert chunk_sizes(7, 3) == [3, 3, 1] and chunk_sizes(7, None) == [7]
    batch = shapeworld_batch(7)
    chunks = condition_chunks(batch, [4, 2, 1])
    assert [c["source"].shape[0] for c in chunks] == [4, 2, 1]
    assert [len(c["instruction"]) for c in chunks] == [4, 2, 1]
    assert torch.equal(torch.cat([c["target"] for c in chunks]), batch["target"])


def test_chunks_split_conditions_and_scores_join_in_order():
    batch = shapeworld_batch(3)
    chunks = condition_chunks(batch, 2)
    assert [c["source"].shape[0] for c in chunks] == [2, 1]
    assert [len(c["instruction"]) for c in chunks] == [2, 1]
    assert torch.equal(torch.cat([c["source"] for c in chunks]), batch["source"])
    assert condition_chunks(batch, 3) == [batch] and condition_chunks(batch, None) == [batch]
    # a chunk whose remote batch failed has only remote_failures: the rest is NaN there
    ok = Scores(torch.ones(2), {"t": torch.ones(2), "remote_failures": torch.zeros(2)}, {})
    failed = Scores(torch.full((3,), float("nan")), {"remote_failures": torch.ones(3)}, {})
    joined = Scores.cat([ok, failed])
    assert torch.equal(joined.parts["remote_failures"], torch.tensor([0.0, 0, 1, 1, 1]))
    assert joined.parts["t"][:2].tolist() == [1, 1] and joined.parts["t"][2:].isnan().all()
    region = RewardOutput(
        torch.ones(2),
        regions=torch.ones(2, 2),
        region_names=("a", "b"),
        region_masks=torch.full((2, 2, 4, 4), 0.5),
    )
    with_regions = Scores.cat([Scores(torch.ones(2), {}, {"r": region}), failed])
    out = with_regions.regions["r"]
    assert out.regions.shape == (5, 2) and out.regions[2:].isnan().all()
    assert out.region_names == ("a", "b") and torch.equal(
        out.region_masks[2:], torch.full((3, 2, 4, 4), 0.5)
    )
