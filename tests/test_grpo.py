"""The GRPO stage: rollouts, the first ratio, degenerate batches, rewards, DDP advantages."""

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    ConstantReward,
    NaNReward,
    Recorder,
    fit_steps,
    lora_params,
    quiet_trainer,
    shapeworld_batch,
    tiny_data,
    tiny_module,
    tiny_policy,
)

from lit_grpo.datamodules.shapeworld import ShapeWorld
from lit_grpo.modules.stalls import TrainingStalled
from lit_grpo.objectives import FlowGRPO
from lit_grpo.objectives.flow_grpo import clipped_policy_loss, gathered_group_advantages
from lit_grpo.perception import ColourSegmenter
from lit_grpo.policies import TinyEditPolicy
from lit_grpo.rewards import (
    BackgroundReward,
    EditSpec,
    Reward,
    RewardInputs,
    RewardOutput,
    TranslationReward,
)
from lit_grpo.sampling.sde import reduce_log_prob


class HalfNaNReward(Reward):
    """Random scores with the first rollout of every group NaN (or `bad`: inf, -inf)."""

    name = "half_nan"

    def __init__(self, bad: float = float("nan")):
        super().__init__()
        self.bad = bad

    def forward(self, inputs):
        n = inputs.images.shape[0]
        scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
        scores[::4] = self.bad
        return RewardOutput(scores)


class NaNUnderGradPolicy(TinyEditPolicy):
    """Samples normally, but its training forward (with grad) returns NaN while `poisoned`:
    a policy whose update blows up."""

    poisoned = True

    def velocity(self, latents, sigma, condition):
        v = super().velocity(latents, sigma, condition)
        return v * float("nan") if torch.is_grad_enabled() and self.poisoned else v


def fit(module, steps=2, batches=2, callbacks=()):
    trainer = quiet_trainer(
        max_steps=steps, limit_train_batches=batches, max_epochs=1, callbacks=list(callbacks)
    )
    trainer.fit(module, tiny_data(train_size=2 * batches, val_size=2))
    return trainer


def test_rollout_layout_and_first_ratio_is_exactly_one():
    module = tiny_module()
    batch = shapeworld_batch()
    rollout = module.sample(batch, torch.Generator().manual_seed(0))
    # 2 conditions x G=4 rollouts, 3 trained SDE steps (the last of 4 steps is the ODE step)
    assert rollout.states.shape == (8, 3, 3, 16, 16) and rollout.log_probs().shape == (8, 3)
    assert rollout.images.shape == (8, 3, 16, 16)
    assert torch.equal(rollout.condition.text[0], rollout.condition.text[3])
    assert not torch.equal(rollout.images[0], rollout.images[1])  # the SDE explores
    rows = torch.arange(8)
    adv = torch.randn(8)
    for k in range(3):
        step = module.sampler.rescore(module.policy, rollout, rows, k)  # with grad, as in update
        log_prob = reduce_log_prob(step.log_prob, "mean")
        assert torch.equal(log_prob.detach(), rollout.log_probs()[:, k])
        _, stats = clipped_policy_loss(log_prob, rollout.log_probs()[:, k], adv, 2e-4)
        assert stats.ratio_mean.item() == 1.0 and stats.clip_fraction.item() == 0.0


def test_training_updates_lora_and_logs_every_statistic():
    module = tiny_module()
    before = lora_params(module)
    trainer = fit(module, steps=2)
    after = lora_params(module)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before), "every LoRA parameter trains within two steps"
    base = [p for n, p in module.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    assert not any(r.training for r in module.rewards)  # judges stay frozen in eval mode
    m = trainer.callback_metrics
    for key in (
        "reward/total",
        "reward/translation",
        "reward/background",
        "reward_std/total",
        "adv/std",
        "groups/zero_spread_fraction",
        "train/approx_kl",
        "train/clip_fraction",
        "time/sampling",
        "time/rewards",
        "time/update",
    ):
        assert key in m, key
    # one minibatch, one inner epoch: on-policy, every log-prob is the recorded one
    assert m["train/ratio"].item() == 1.0
    assert m["train/approx_kl"].item() == 0.0 and m["train/clip_fraction"].item() == 0.0


def test_all_zero_spread_batch_is_skipped_not_fatal():
    module = tiny_module([ConstantReward()])
    before = lora_params(module)
    trainer = fit(module, steps=2, batches=2)
    assert trainer.callback_metrics["groups/zero_spread_fraction"].item() == 1.0
    assert trainer.callback_metrics["train/skipped"].item() == 1.0
    assert all(torch.equal(before[n], p) for n, p in lora_params(module).items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_rewards_are_dropped_and_training_goes_on(bad):
    module = tiny_module([HalfNaNReward(bad)])
    before = lora_params(module)
    trainer = fit(module, steps=1, batches=1)
    assert trainer.callback_metrics["groups/dropped_samples"].item() == 2.0
    assert trainer.callback_metrics["train/skipped"].item() == 0.0
    assert any(not torch.equal(before[n], p) for n, p in lora_params(module).items())


def test_an_all_nan_run_still_counts_its_iterations_to_max_steps():
    module = tiny_module([NaNReward()])
    before = lora_params(module)
    seen = Recorder("train/skipped", "groups/dropped_samples")
    trainer = fit_steps(module, 4, [seen])
    assert trainer.global_step == 4 and module.iteration == 4 and len(seen.rows) == 4
    assert all(r == {"train/skipped": 1.0, "groups/dropped_samples": 8.0} for r in seen.rows)
    assert all(torch.equal(before[n], p) for n, p in lora_params(module).items())


def test_max_steps_counts_iterations_not_optimizer_steps():
    module = tiny_module(minibatches=2, inner_epochs=2)
    seen = Recorder("train/optimizer_steps")
    trainer = fit_steps(module, 4, [seen])
    assert trainer.global_step == 4 and module.iteration == 4
    assert [r["train/optimizer_steps"] for r in seen.rows] == [4.0] * 4
    # the LR schedule steps with the optimiser: 16 steps, not 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 16


def test_a_minibatch_of_only_masked_rows_is_not_stepped(monkeypatch):
    """Condition 0's group is zero-spread (IndexReward); with the rows in order, minibatch 1
    of 2 holds exactly its 4 rows, all masked: no forward, no step, no division by zero."""
    monkeypatch.setattr(
        torch, "randperm", lambda n, device=None, generator=None: torch.arange(n, device=device)
    )
    module = tiny_module([IndexReward()], minibatches=2, weight_decay=0.1)
    seen = Recorder("train/optimizer_steps", "train/empty_minibatches", "train/loss")
    trainer = fit_steps(module, 1, [seen], train_size=2, shuffle=False)
    (row,) = seen.rows
    assert row["train/optimizer_steps"] == 1 and row["train/empty_minibatches"] == 1
    assert torch.isfinite(torch.tensor(row["train/loss"]))
    opt = trainer.optimizers[0]
    assert {int(opt.state[p]["step"]) for p in opt.state} == {1}  # AdamW stepped once
    assert all(torch.isfinite(p).all() for p in lora_params(module).values())


def test_nonfinite_steps_are_skipped_counted_and_training_goes_on():
    module = tiny_module(policy=tiny_policy(cls=NaNUnderGradPolicy))

    class PoisonSecond(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.policy.poisoned = pl_module.iteration == 1

    seen = Recorder("train/nonfinite_skipped", "train/optimizer_steps")
    trainer = fit_steps(module, 3, [PoisonSecond(), seen])
    assert trainer.global_step == 3
    assert [r["train/nonfinite_skipped"] for r in seen.rows] == [0.0, 1.0, 0.0]
    assert [r["train/optimizer_steps"] for r in seen.rows] == [1.0, 0.0, 1.0]
    assert module.stalls.nonfinite.count == 0
    assert all(torch.isfinite(p).all() for p in lora_params(module).values())


def test_nonfinite_iterations_in_a_row_stop_the_run_naming_the_step():
    module = tiny_module(policy=tiny_policy(cls=NaNUnderGradPolicy), max_nonfinite_in_a_row=3)
    before = lora_params(module)
    with pytest.raises(TrainingStalled) as err:
        fit_steps(module, 10)
    assert str(err.value).startswith(
        "GRPO stepped nothing for 3 iterations in a row (iterations 0..2, global_step 2, "
        "model.init_args.max_nonfinite_in_a_row=3): a minibatch's loss or gradient was not "
        "finite (train/nonfinite_skipped). Those steps were skipped, not taken."
    )
    assert all(torch.equal(before[n], p) for n, p in lora_params(module).items())  # no step


def test_spatial_rewards_on_exact_edits_and_misses():
    data = ShapeWorld("test", 12, 32, ("translate",))
    batch = torch.utils.data.default_collate([data[i] for i in range(12)])
    seg = ColourSegmenter()

    def inputs(images):
        return RewardInputs(
            images,
            batch["source"],
            batch["instruction"],
            EditSpec.from_batch(batch),
            seg(batch["source"], batch["object"]),
            seg(images, batch["object"]),
        )

    perfect = TranslationReward(move_fraction=0.25)(inputs(batch["target"]))
    assert torch.allclose(perfect.scores, torch.ones(12), atol=0.02)
    assert perfect.extras["translation_success"].sum() == 12
    unmoved = TranslationReward()(inputs(batch["source"]))
    assert unmoved.scores.abs().max() < 0.02
    blank = torch.full_like(batch["source"], 0.5)  # the object is gone
    missed = TranslationReward(across_penalty=0.5)(inputs(blank))
    assert torch.equal(missed.scores, torch.full((12,), -1.5))
    bg = BackgroundReward()(inputs(batch["target"]))
    # the true target leaves the background untouched, up to faint anti-aliased edge pixels
    # beyond the 1 px margin around the detected masks
    assert bg.scores.abs().max() < 1e-3
    assert torch.equal(BackgroundReward()(inputs(batch["source"])).scores, torch.zeros(12))
    noisy = (batch["source"] + 0.1 * torch.randn_like(batch["source"])).clamp(0, 1)
    assert (BackgroundReward()(inputs(noisy)).scores < -0.05).all()


def test_reward_scores_only_its_task():
    data = ShapeWorld("test", 8, 32, ("rotate", "scale"))
    batch = torch.utils.data.default_collate([data[i] for i in range(8)])
    seg = ColourSegmenter()
    out = TranslationReward()(
        RewardInputs(
            batch["target"],
            batch["source"],
            batch["instruction"],
            EditSpec.from_batch(batch),
            seg(batch["source"], batch["object"]),
            seg(batch["target"], batch["object"]),
        )
    )
    assert torch.equal(out.scores, torch.zeros(8))


def test_constructor_errors():
    with pytest.raises(ValueError, match="group_size"):
        tiny_module(group_size=1)
    with pytest.raises(ValueError, match="kl_beta"):
        tiny_module(lora=None, objective=FlowGRPO(kl_beta=0.1))
    with pytest.raises(ValueError, match="max_nonfinite_in_a_row"):
        tiny_module(max_nonfinite_in_a_row=0)
    with pytest.raises(ValueError, match="max_skipped_in_a_row must be >= 1, got 0"):
        tiny_module(max_skipped_in_a_row=0)


# --- DDP: 2 gloo processes give the same advantages and loss as one --------------------------
G, N_PER_RANK = 4, 8


def _data():
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(2 * N_PER_RANK, generator=g)
    rewards[4:8] = 0.5  # a zero-spread group on rank 0 only: uneven valid counts
    rewards[13] = float("nan")
    logp_old = torch.randn(2 * N_PER_RANK, generator=g)
    logp_new = logp_old + 1e-4 * torch.randn(2 * N_PER_RANK, generator=g)
    return rewards, logp_old, logp_new


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rewards, logp_old, logp_new = _data()
    local = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)

    def gather(t):
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.stack(parts)

    adv, values, valid = gathered_group_advantages(rewards[local], G, gather, rank, std="global")
    denom = adv.valid.sum().item() / world
    loss, _ = clipped_policy_loss(
        logp_new[local], logp_old[local], values, 2e-4, valid.float(), denom
    )
    dist.all_reduce(loss)  # DDP averages gradients: the effective loss is the rank mean
    out[rank] = torch.cat([values, (loss / world).reshape(1)])
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process():
    rewards, logp_old, logp_new = _data()
    adv, values, valid = gathered_group_advantages(rewards, G, lambda t: t, 0, std="global")
    loss, _ = clipped_policy_loss(logp_new, logp_old, values, 2e-4, valid.float())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    ddp_values = torch.cat([out[0][:-1], out[1][:-1]])
    assert torch.allclose(ddp_values, values, atol=1e-6)
    assert torch.allclose(out[0][-1], loss, atol=1e-7) and torch.allclose(out[1][-1], loss)
    assert adv.zero_spread.tolist() == [False, True, False, False]


class KeepUpdateInputs:
    """Stands in for a module's update loop and runs it, keeping each call's record, targets
    and the LoRA weights the call started from."""

    def __init__(self, module):
        self.update, self.calls = module.update, []
        module.update = self

    def __call__(self, module, objective, sampler, record, targets, generator):
        self.calls.append((record, targets, lora_params(module)))
        return self.update(module, objective, sampler, record, targets, generator)


def test_the_logged_kl_is_the_kl_to_the_reference_by_hand():
    """train/kl by the formula of Flow-GRPO's KL (ALGORITHMS.md): per trained step, per row
    the mean over elements of (mean_theta - mean_ref)^2 / (2 std^2), std the step's
    sigma-level std, averaged over the valid rows, then over the steps. One minibatch and one
    inner epoch: every term is computed before the optimiser steps."""
    module = tiny_module(objective=FlowGRPO(kl_beta=0.05), lr=1e-2)  # a KL far from 0
    seen, kept = Recorder("train/kl"), KeepUpdateInputs(module)
    fit(module, steps=2, batches=2, callbacks=[seen])
    assert seen.rows[0]["train/kl"] == 0.0  # step 1 starts at the reference (LoRA B = 0)
    record, targets, weights = kept.calls[1]
    valid, rows = targets.valid.float(), torch.arange(len(record))
    per_step = []
    with torch.no_grad():
        for name, p in module.named_parameters():  # the weights step 2 sampled and scored with
            if name in weights:
                p.copy_(weights[name])
        for k in range(record.num_trained_steps):
            step = module.sampler.rescore(module.policy, record, rows, k)
            with module.policy.reference():
                ref = module.sampler.rescore(module.policy, record, rows, k)
            std = step.diffusion.view(-1, 1, 1, 1)
            per_row = ((step.mean - ref.mean) ** 2 / (2 * std**2)).flatten(1).mean(1)
            per_step.append((per_row * valid).sum() / valid.sum())
    expected = torch.stack(per_step).mean().item()
    assert record.num_trained_steps == 3 and valid.sum() > 0 and expected > 1e-8  # ~2e-7
    assert seen.rows[1]["train/kl"] == pytest.approx(expected, rel=1e-5)


def test_test_and_predict_loops(tmp_path):
    module = tiny_module()
    trainer = quiet_trainer(
        limit_test_batches=1, limit_predict_batches=1, default_root_dir=tmp_path
    )
    data = tiny_data(test_size=2)
    (metrics,) = trainer.test(module, data, verbose=False)
    assert "test/reward" in metrics and "test/translation" in metrics
    (edits,) = trainer.predict(module, data)
    assert edits.shape == (2, 3, 16, 16)


class IndexReward(Reward):
    """A reward fixed by (condition index, place in the group): independent of the rollout
    noise, so one process and two DDP ranks must normalise exactly the same numbers. The
    condition with index 0 gets a constant (zero-spread) group."""

    name = "index"

    def forward(self, inputs):
        index = inputs.ids.float()
        place = torch.arange(index.numel()).float() % 4
        return RewardOutput(
            torch.where(index == 0, torch.ones_like(index), torch.sin(7 * index + 3 * place))
        )


class SaveMetrics(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        keys = (
            "train/loss",
            "adv/std",
            "adv/abs_max",
            "groups/zero_spread_fraction",
            "reward/total",
        )
        out = {k: float(trainer.callback_metrics[k]) for k in keys}
        torch.save(out, f"{self.path}.rank{trainer.global_rank}")


def _grpo_metrics(tmp_path, devices, batch_size):
    module = tiny_module([IndexReward()])
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        callbacks=[SaveMetrics(tmp_path / f"d{devices}")],
    )
    trainer.fit(module, tiny_data(batch_size=batch_size, val_size=2, shuffle=False))
    return [torch.load(p) for p in sorted(tmp_path.glob(f"d{devices}.rank*"))]


def test_grpo_module_under_ddp_spawn_matches_one_process(tmp_path):
    """Lightning's DDP (2 gloo ranks, 2 conditions each) vs 1 process with all 4 conditions."""
    (single,) = _grpo_metrics(tmp_path, devices=1, batch_size=4)
    ranks = _grpo_metrics(tmp_path, devices=2, batch_size=2)
    assert len(ranks) == 2
    for key in ("adv/std", "adv/abs_max", "groups/zero_spread_fraction"):  # gathered statistics
        assert ranks[0][key] == pytest.approx(single[key], abs=1e-6)
        assert ranks[1][key] == pytest.approx(single[key], abs=1e-6)
    assert single["groups/zero_spread_fraction"] == 0.25  # condition 0 is skipped everywhere
    # DDP averages the ranks' gradients: the effective loss is the mean of the rank losses
    ddp_loss = (ranks[0]["train/loss"] + ranks[1]["train/loss"]) / 2
    assert ddp_loss == pytest.approx(single["train/loss"], abs=1e-6)
    assert ranks[0]["train/loss"] != pytest.approx(
        ranks[1]["train/loss"]
    )  # ranks saw different data
