"""Scale-out (issue 13): DDP and FSDP2 on 2 CPU processes (gloo) against one process.

Two launches of `tests/distributed_fit.py` (Lightning starts the second rank), one per
strategy, each running three fits in its two processes: `compare` (the same conditions and
rollouts as one process with the batch of both ranks), and `whole` / `resumed` (a run and
the same run resumed from its step-1 checkpoint). The one-process reference runs here.

Tolerances, and why they are not 0:
- advantages: exact. Every rank normalises the same gathered rewards.
- losses: 1e-7 absolute (they are ~5e-5: sums over rows of advantages, |A| <= 2, times
  ratios within 1e-4 of 1, plus 0.05 x the KL to the adapter-off reference). Two ranks sum
  their rows apart and the gradient average adds the halves; one process sums them in one
  go. float32 addition in another order differs by a few ulps of the terms (measured: at
  most 1.1e-8).
- LoRA weights after 2 AdamW steps (lr 1e-2): 1e-5 absolute (measured 2.0e-6). The gradients
  differ by the same rounding; AdamW divides each element by its running RMS, which turns
  a rounding difference of a small element into a larger relative step difference.
- gradient norms (before and after clipping at 3e-4): 1e-4 relative, the same rounding.
- resume: bit for bit (same processes, same world size, same thread count).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import store_client

ROOT = Path(__file__).resolve().parent.parent
LOSS_ATOL, LORA_ATOL, NORM_RTOL = 1e-7, 1e-5, 1e-4
CLIP = 3e-4  # distributed_fit.CLIP


def launch(strategy: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tests/distributed_fit.py"), "--strategy", strategy]
    cmd += ["--devices", "2", "--out", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.stem: torch.load(p, weights_only=False) for p in out.glob("*rank*.pt")}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process, batch 4: the conditions of both ranks' batches of 2."""
    import distributed_fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks
    try:
        args = distributed_fit.parse(
            ["--out", str(tmp_path_factory.mktemp("single")), "--batch-size", "4"]
            + ["--scenarios", "compare"]
        )
        distributed_fit.run(args)
    finally:
        torch.set_num_threads(threads)
    return torch.load(Path(args.out) / "comparerank0.pt", weights_only=False)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    return launch("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    results = launch("fsdp", out)
    results["root"] = out
    return results


def _by_condition(advantages: torch.Tensor, index: list[int]) -> dict[int, torch.Tensor]:
    groups = advantages.view(len(index), -1)
    return {i: groups[k] for k, i in enumerate(index)}


def assert_matches_one_process(ranks: list[dict], single: dict) -> None:
    for it, one in enumerate(single["seen"]):
        parts = [r["seen"][it] for r in ranks]
        # batch s of every rank together: the conditions of one process's batch s
        assert sorted(parts[0]["index"] + parts[1]["index"]) == sorted(one["index"])
        expected = _by_condition(one["all"], one["index"])
        for part in parts:
            got = _by_condition(part["local"], part["index"])
            assert all(torch.equal(got[i], expected[i]) for i in got)  # exact
            assert torch.equal(part["all"], parts[0]["all"])  # every rank: all advantages
        # the gradient average over ranks is the gradient of the mean of their losses
        mean = sum(p["loss"] for p in parts) / len(parts)
        assert abs(mean - one["loss"]) <= LOSS_ATOL, (it, mean, one["loss"])
        # the norm of the whole gradient (every FSDP2 shard), the same on every rank
        assert parts[0]["grad_norm"] == parts[1]["grad_norm"]
        assert parts[0]["grad_norm"] == pytest.approx(one["grad_norm"], rel=NORM_RTOL)
    # clipping scaled every rank's gradient (each shard) to the one process's clipped norm
    clipped = single["clipped"]
    assert len(clipped) == 4 and min(clipped) < CLIP * 0.99 < max(clipped)  # binds, not always
    assert all(c < CLIP * (1 + 1e-6) for c in clipped)
    for rank in ranks:
        assert rank["clipped"] == ranks[0]["clipped"]
        assert rank["clipped"] == pytest.approx(clipped, rel=NORM_RTOL)
    for rank in ranks:
        assert rank["lora"].keys() == single["lora"].keys()
        for name, weight in single["lora"].items():
            assert torch.equal(rank["lora"][name], ranks[0]["lora"][name])  # replicas agree
            assert torch.allclose(rank["lora"][name], weight, rtol=0, atol=LORA_ATOL), name
        moved = [n for n, w in rank["lora"].items() if "lora_B" in n and w.abs().max() > 0]
        assert moved, "training moved the adapter (B starts at 0)"
        assert rank["global_step"] == 2 and rank["optimizer_steps"] == [4]  # 2 x inner_epochs


def test_ddp_two_ranks_give_the_advantages_and_loss_of_one_process(single, ddp):
    ranks = [ddp["comparerank0"], ddp["comparerank1"]]
    assert [r["dp"] for r in ranks] == [(0, 2), (1, 2)]
    assert not any(r["sharded"] for r in ranks)
    assert_matches_one_process(ranks, single)


def test_fsdp2_two_ranks_give_the_advantages_and_loss_of_one_process(single, fsdp):
    ranks = [fsdp["comparerank0"], fsdp["comparerank1"]]
    # data-parallel rank and size from the device mesh; master weights stay float32
    assert [r["dp"] for r in ranks] == [(0, 2), (1, 2)]
    assert all(r["sharded"] and r["master_dtypes"] == ["torch.float32"] for r in ranks)
    assert_matches_one_process(ranks, single)


def assert_resumed_where_it_stopped(whole: dict, resumed: dict) -> None:
    assert len(whole["seen"]) == 3 and len(resumed["seen"]) == 2  # resumed after step 1
    # the data position: the same conditions, mid-epoch and across the epoch boundary
    assert [s["index"] for s in resumed["seen"]] == [s["index"] for s in whole["seen"][1:]]
    assert [s["loss"] for s in resumed["seen"]] == [s["loss"] for s in whole["seen"][1:]]
    assert resumed["global_step"] == whole["global_step"] == 3
    assert resumed["iteration"] == whole["iteration"] == 3
    assert resumed["optimizer_steps"] == whole["optimizer_steps"] == [6]  # AdamW's state
    for name, weight in whole["lora"].items():  # rollout noise and optimiser state too
        assert torch.equal(resumed["lora"][name], weight), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_resumed_two_rank_run_continues_where_it_stopped(strategy, request):
    results = request.getfixturevalue(strategy)
    for rank in (0, 1):
        assert_resumed_where_it_stopped(results[f"wholerank{rank}"], results[f"resumedrank{rank}"])
    # the ranks drew different rollout noise (each its own generator, both resumed)
    assert results["wholerank0"]["seen"][0]["loss"] != results["wholerank1"]["seen"][0]["loss"]


def test_fsdp2_checkpoints_are_sharded_and_the_adapter_is_exported_whole(fsdp):
    from safetensors.torch import load_file

    from lit_grpo.checks import read_checkpoint
    from lit_grpo.policies.weights import IncompatibleWeightsError, resolve_weights_path

    folder = fsdp["root"] / "whole" / "checkpoints"
    last = folder / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard file per rank
    meta = read_checkpoint(last, "checkpoint")
    assert meta["global_step"] == 3 and meta["grpo_generators"].shape[0] == 2
    entry = meta["lit_grpo_policy"]  # names the policy, holds no full copy of it
    assert entry["class"] == "TinyEditPolicy" and entry["state_dict"] is None
    assert entry["config"]["depth"] == 2
    with pytest.raises(IncompatibleWeightsError, match="distributed checkpoint.*lora.init_from"):
        resolve_weights_path(str(last))
    # the adapter, gathered whole and written once by rank 0, in peft's layout
    exports = sorted(p.name for p in (folder / "lora").iterdir())
    assert exports == [f"lora-step={s:06d}.safetensors" for s in (1, 2, 3)]
    exported = load_file(folder / "lora" / "lora-step=000003.safetensors")
    gathered = fsdp["wholerank0"]["lora"]
    assert len(exported) == len(gathered)
    for name, weight in gathered.items():
        key = name.removeprefix("policy.transformer.").replace(".default.", ".")
        assert torch.equal(exported[key], weight), key
    # a later stage starts from it: the base weights and lora.init_from
    from lit_grpo.policies import LoraSettings, TinyEditPolicy

    export = str(folder / "lora" / "lora-step=000003.safetensors")
    policy = TinyEditPolicy(width=32, depth=2, heads=2)
    policy.prepare_training(LoraSettings(rank=4, alpha=4, init_from=export))
    started = {f"policy.{n}": p for n, p in policy.named_parameters() if "lora_" in n}
    assert started.keys() == gathered.keys()
    assert all(torch.equal(started[n], w) and started[n].requires_grad for n, w in gathered.items())
    with pytest.raises(ValueError, match="holds an adapter of rank 4.*asks for rank 8"):
        TinyEditPolicy(width=32, depth=2, heads=2).add_lora(LoraSettings(rank=8, init_from=export))


def test_the_cli_reads_a_distributed_checkpoint_and_checks_its_policy(fsdp, capsys, in_tmp):
    from test_user_errors import GRPO, error_of

    last = fsdp["root"] / "whole" / "checkpoints" / "last.ckpt"
    # the folder is accepted and its meta.pt read: a config with another depth is refused
    depth = "--model.init_args.policy.init_args.depth=1"
    line = error_of(capsys, "fit", "--config", GRPO, depth, f"--ckpt_path={last}")
    assert "another policy architecture" in line and "depth: checkpoint 2 vs config 1" in line


@pytest.mark.slow
def test_two_nodes_on_localhost_fit_and_resume_through_the_cli(tmp_path):
    """scripts/two_node_local.sh: torchrun --nnodes=2 (one process each) runs the CLI with the
    FSDP2 overlay; then the same launch resumes with --ckpt_path last (a checkpoint folder).
    1-3 minutes on 2 cores."""

    from lit_grpo.checks import read_checkpoint

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    script = [str(ROOT / "scripts/two_node_local.sh"), str(tmp_path)]
    for extra in ([], ["--trainer.max_steps=3", "--ckpt_path=last"]):
        done = subprocess.run(
            [*script, *extra], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert len(list(last.glob("*.distcp"))) == 2  # one shard file per "node"
    meta = read_checkpoint(last, "checkpoint")
    assert meta["global_step"] == 3 and meta["grpo_generators"].shape[0] == 2
    assert (last.parent / "lora" / "lora-step=000003.safetensors").is_file()
    client = store_client(tmp_path)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("shapeworld-talk2move").experiment_id]
    )
    assert run.info.status == "FINISHED" and run.info.run_id == meta["mlflow_run_id"]
    assert len(client.get_metric_history(run.info.run_id, "reward/total")) == 3


@pytest.mark.gpu
def test_fsdp2_grpo_steps_on_one_gpu(tmp_path):
    """The FSDP2 path (bf16, activation checkpointing) on one GPU: trains and resumes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tests/distributed_fit.py"), "--strategy", "fsdp"]
    cmd += ["--devices", "1", "--accelerator", "gpu", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = torch.load(tmp_path / "wholerank0.pt", weights_only=False)
    assert whole["sharded"] and whole["global_step"] == 3
    assert_resumed_where_it_stopped(
        whole, torch.load(tmp_path / "resumedrank0.pt", weights_only=False)
    )


# --- the pieces, on one process ----------------------------------------------------------
def test_ranks_take_turns_through_the_epoch_order_and_together_cover_one_process_batches():
    from lit_grpo.datamodules.resumable import EpochSampler

    one = list(EpochSampler(10, seed=3))
    ranks = [list(EpochSampler(10, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # 10 padded to 12 with the order's first two
    assert [r[k] for k in range(4) for r in ranks] == (one + one[:2])
    # batch s of 2 per rank x 3 ranks = positions [6s, 6s + 6) of one process's order
    assert sorted(ranks[0][:2] + ranks[1][:2] + ranks[2][:2]) == sorted(one[:6])
    resumed = EpochSampler(10, seed=3, num_replicas=3, rank=1)
    resumed.skip = 2  # this rank's own delivered samples
    assert list(resumed) == ranks[1][2:]
    with pytest.raises(ValueError, match="rank 3 is not one of 3"):
        EpochSampler(10, num_replicas=3, rank=3)


def test_shard_modules_are_the_transformer_blocks():
    from torch import nn

    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.policies.base import EditPolicy

    policy = TinyEditPolicy(width=32, depth=3, heads=2)
    assert policy.shard_modules() == list(policy.transformer.blocks)
    # the default: every ModuleList named *blocks directly under the denoiser (diffusers'
    # transformer_blocks and single_transformer_blocks), in order
    denoiser = nn.Module()
    denoiser.transformer_blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    denoiser.single_transformer_blocks = nn.ModuleList([nn.Linear(2, 2)])
    denoiser.proj_out = nn.Linear(2, 2)
    blocks = [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]
    policy.transformer = denoiser
    assert EditPolicy.shard_modules(policy) == blocks
    del denoiser.transformer_blocks, denoiser.single_transformer_blocks
    with pytest.raises(NotImplementedError, match="override shard_modules"):
        EditPolicy.shard_modules(policy)


def test_sharding_refuses_trainable_weights_outside_the_denoiser_and_unknown_dtypes():
    from lit_grpo.modules.sharding import ShardingSettings, shard_policy
    from lit_grpo.policies import TinyEditPolicy

    policy = TinyEditPolicy(width=32, depth=1, heads=2)
    policy.prepare_training(None, full="all")  # SFT from scratch trains the text encoder
    with pytest.raises(ValueError, match="also trains.*text_encoder.*LoRA.*ddp.yaml"):
        shard_policy(policy, mesh=None, settings=ShardingSettings())
    with pytest.raises(ValueError, match="sharding.param_dtype must be one of"):
        ShardingSettings(param_dtype="bf16")


def test_sharding_activation_checkpointing_turns_on_the_policys_own_switch(monkeypatch):
    """`ShardingSettings.activation_checkpointing` calls `policy.checkpoint_activations`:
    with the policy's own flag on too, the blocks are wrapped once, not twice."""
    import torch.distributed.fsdp as fsdp

    from lit_grpo.modules.sharding import ShardingSettings, shard_policy
    from lit_grpo.policies import TinyEditPolicy

    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: sharded.append(module))
    both = TinyEditPolicy(width=32, depth=2, heads=2, activation_checkpointing=True)
    both.prepare_training(None)  # the denoiser trains, the text encoder is frozen
    wrappers = [vars(b)["forward"] for b in both.shard_modules()]
    shard_policy(both, None, ShardingSettings(activation_checkpointing=True))
    assert [vars(b)["forward"] for b in both.shard_modules()] == wrappers  # the same ones
    assert all(w.args[1] is type(b).forward for w, b in zip(wrappers, both.shard_modules()))
    assert sharded == [*both.shard_modules(), both.denoiser]
    for policy_flag, sharding_flag in ((False, True), (True, False), (False, False)):
        policy = TinyEditPolicy(width=32, depth=2, heads=2, activation_checkpointing=policy_flag)
        policy.prepare_training(None)
        shard_policy(policy, None, ShardingSettings(activation_checkpointing=sharding_flag))
        assert policy.checkpointing_activations == (policy_flag or sharding_flag)


@pytest.mark.parametrize("overlay", ["fsdp", "ddp"])
def test_the_strategy_overlays_parse_and_build_their_trainer(overlay, in_tmp):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lit_grpo.cli import run_cli

    config = ["--config", str(ROOT / "configs/talk2move.yaml")]
    config += ["--config", str(ROOT / f"configs/strategy/{overlay}.yaml")]
    cli = run_cli([*config, "--trainer.accelerator=cpu"], run=False)
    strategy = cli.trainer.strategy
    assert cli.trainer.num_devices == 2 and cli.trainer.num_nodes == 1
    if overlay == "fsdp":
        assert isinstance(strategy, ModelParallelStrategy)
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
        sharding = cli.model.sharding
        assert (sharding.param_dtype, sharding.reduce_dtype) == ("bfloat16", "float32")
    else:
        assert isinstance(strategy, DDPStrategy)
