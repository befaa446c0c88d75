"""Tiny GRPO fits on 1 or more CPU processes (gloo), for tests/test_distributed.py.

    python tests/distributed_fit.py --strategy fsdp --devices 2 --out DIR

Lightning launches the other ranks itself (it runs this script again with LOCAL_RANK set).
Three fits run in the same processes, each writing `DIR/<tag>rank<r>.pt` (per iteration
the gathered advantages, this rank's advantages, the conditions it trained on and its loss;
at the end the LoRA weights, gathered whole under FSDP2, the global step, the optimiser's
step counts):

- `compare`: 2 iterations with `ConditionNoise` in float32, gradients clipped at `CLIP`
  (below some steps' norms), to hold against one process (`--scenarios compare --strategy
  single --batch-size 4`); it also records each step's gradient norm after clipping;
- `whole`: 3 iterations with the module's own (per-rank) noise, a checkpoint every step;
- `resumed`: the same run resumed from `whole`'s step-1 checkpoint.

The rollout noise of `compare` is a function of the condition and the iteration, not of the
rank (`ConditionNoise`), so that one process with batch 4 and two with batch 2 roll out the
very same edits and their losses and gradients can be compared. `IndexReward` scores a
rollout by its condition and its place in the group: the advantages are exact numbers.
"""

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_grpo.callbacks import LoraExporter, ModelCheckpoint  # noqa: E402
from lit_grpo.datamodules import ShapeWorldDataModule  # noqa: E402
from lit_grpo.modules import GRPOModule  # noqa: E402
from lit_grpo.modules.sharding import ShardingSettings  # noqa: E402
from lit_grpo.modules.update import _grad_norm  # noqa: E402
from lit_grpo.objectives import FlowGRPO  # noqa: E402
from lit_grpo.policies import LoraSettings, TinyEditPolicy  # noqa: E402
from lit_grpo.rewards import Reward, RewardOutput  # noqa: E402
from lit_grpo.sampling.noise import NoiseBuilder  # noqa: E402

GROUP = 4
CLIP = 3e-4  # max_grad_norm of `compare`


class IndexReward(Reward):
    """sin(7 * condition index + 3 * place in the group): fixed numbers, nothing random."""

    name = "index"

    def forward(self, inputs):
        index = inputs.ids.float()
        place = torch.arange(index.numel()).float() % GROUP
        return RewardOutput(torch.sin(7 * index + 3 * place))


class ConditionNoise(NoiseBuilder):
    """Each rollout's noise drawn from a seed of (condition index, iteration, place in the
    group, step): the same rollouts whichever rank holds the condition. The module passes
    index * 1000 + iteration as `regions` (`ConditionSeeded.sample_regions`)."""

    def initial(self, like, group_size, generator=None, regions=None):
        return self._draw(like, group_size, regions, 0)

    def step(self, like, group_size, step, generator=None, regions=None):
        return self._draw(like, group_size, regions, step + 1)

    def _draw(self, like, group_size, regions, salt):
        keys = regions[:, 0, 0].long().tolist()
        rows = []
        for row, key in enumerate(keys):
            seed = (key * GROUP + row % group_size) * 100 + salt
            g = torch.Generator().manual_seed(seed)
            rows.append(torch.randn(like.shape[1:], generator=g))
        return torch.stack(rows).to(like)


class Recorded(GRPOModule):
    """The tiny GRPO module of these tests; records what every iteration computed. With
    `ConditionNoise` its rollouts depend on the condition, not on the rank."""

    def __init__(self, **kwargs):
        torch.manual_seed(0)
        policy = TinyEditPolicy(width=32, depth=2, heads=2)
        for p in policy.parameters():  # open adaLN-Zero's gates: gradients reach LoRA
            torch.nn.init.normal_(p, std=0.1)
        super().__init__(
            policy,
            [IndexReward()],
            lora=LoraSettings(rank=4, alpha=4),
            group_size=GROUP,
            sample_steps=3,
            eval_steps=2,
            inner_epochs=2,  # the second pass has a ratio != 1: a loss that is not ~0
            objective=FlowGRPO(kl_beta=0.05),  # a reference forward, adapter off, sharded too
            lr=1e-2,
            **kwargs,
        )
        self.seen: list[dict] = []
        self.clipped: list[float] = []  # the gradient norm each optimiser step is given

    def on_before_optimizer_step(self, optimizer):
        # after clipping; over every shard under FSDP2 (a collective: every rank is here)
        self.clipped.append(_grad_norm(self).item())

    def sample_regions(self, batch):
        if not isinstance(self.sampler.noise, ConditionNoise):
            return None
        key = batch["index"].double() * 1000 + self.iteration  # [B]
        _, h, w = self.policy.latent_shape(tuple(batch["source"].shape[-2:]))
        return key.repeat_interleave(self.hparams.group_size)[:, None, None].expand(-1, h, w)

    def advantages(self, scores, record):
        adv, targets = super().advantages(scores, record)
        self._last = {"all": adv.values.clone(), "local": targets.advantages.clone()}
        return adv, targets

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = self.trainer.callback_metrics
        loss, norm = m["train/loss"].item(), m["train/grad_norm"].item()
        self.seen.append({**self._last, "index": batch["index"].tolist(), "loss": loss})
        self.seen[-1]["grad_norm"] = norm  # before clipping, the mean over the steps


def lora_weights(module) -> dict:
    """The adapter's tensors, gathered whole on every rank (a collective under FSDP2)."""
    from lit_grpo.callbacks.lora_export import _whole

    out = {}
    for name, p in module.named_parameters():
        if "lora_" in name:
            out[name] = _whole(p.detach()).clone().cpu()
    return out


def strategy_of(name: str, devices: int):
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # one node: every rank is a data-parallel replica
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return {"single": "auto", "ddp": "ddp"}[name]


def fit(args, tag: str, steps: int, ckpt: str | None = None, **module_kwargs) -> dict:
    """One fit of `Recorded`; what it computed, also written to `<out>/<tag>rank<r>.pt`."""
    out = Path(args.out) / tag
    module = Recorded(**module_kwargs)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", save_last=True, save_top_k=-1, every_n_train_steps=1
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy_of(args.strategy, args.devices),
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
        callbacks=[checkpoint, LoraExporter()],
    )
    data = ShapeWorldDataModule(
        resolution=16, batch_size=args.batch_size, tasks=["translate"], train_size=8, val_size=2
    )
    trainer.fit(module, data, ckpt_path=ckpt)
    opt = trainer.optimizers[0]
    result = {
        "seen": module.seen,
        "lora": lora_weights(module),
        "global_step": trainer.global_step,
        "iteration": module.iteration,
        "optimizer_steps": sorted({int(s["step"]) for s in opt.state.values()}),
        "clipped": module.clipped,
        "world": trainer.world_size,
        "dp": (module.data_parallel_rank, module.data_parallel_size),
        "sharded": module.is_sharded,
        "master_dtypes": sorted({str(p.dtype) for p in module.policy.denoiser.parameters()}),
    }
    torch.save(result, Path(args.out) / f"{tag}rank{trainer.global_rank}.pt")
    return result


def run(args) -> None:
    if "compare" in args.scenarios:
        # the gradient norms are ~3e-4 here: clipping at CLIP binds on some steps, not all
        sharding = ShardingSettings("float32")
        fit(args, "compare", 2, noise=ConditionNoise(), sharding=sharding, max_grad_norm=CLIP)
    if "resume" in args.scenarios:
        # bf16 compute and activation checkpointing under FSDP2 (ignored by the others)
        sharding = ShardingSettings("bfloat16", activation_checkpointing=True)
        fit(args, "whole", 3, sharding=sharding)
        ckpt = Path(args.out) / "whole" / "checkpoints" / "epoch=0-step=1.ckpt"
        fit(args, "resumed", 3, ckpt=str(ckpt), sharding=sharding)


def parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", nargs="+", default=["compare", "resume"])
    return parser.parse_args(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(parse())
