"""GRPO step time and peak memory, unsharded against FSDP2, on whatever device is present.

    python benchmarks/fsdp_step.py                     # every variant, 1 rank, a table
    python benchmarks/fsdp_step.py --devices 2         # 2 ranks each (CPU: gloo processes)
    python benchmarks/fsdp_step.py --width 512 --depth 12 --resolution 64   # a larger editor

Variants (each in its own process, so peak memory is its own):
- `unsharded`:       Lightning's default strategy on 1 device (DDP with --devices > 1),
                     float32;
- `fsdp2-fp32`:      ModelParallelStrategy, every transformer block its own FSDP2 unit,
                     float32 compute;
- `fsdp2-bf16`:      the same with bf16 compute, fp32 reduction (configs/strategy/fsdp.yaml);
- `fsdp2-bf16-ac`:   and activation checkpointing of each block.

The stage is `GRPOModule` with the embedded editor (random weights of the given size, LoRA
r16), B conditions x G rollouts, the full SDE trajectory trained. Step time: the mean over
the steps after the first (warm-up); peak memory: `torch.cuda.max_memory_allocated` on a
GPU, the process's peak RSS (ru_maxrss, everything the process holds) on a CPU; both of
rank 0. On one device FSDP2 shards nothing: it shows the cost of its machinery and what
bf16 and checkpointing save; with several devices each rank holds 1/N of the weights.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "unsharded": None,
    "fsdp2-fp32": dict(param_dtype="float32"),
    "fsdp2-bf16": dict(param_dtype="bfloat16"),
    "fsdp2-bf16-ac": dict(param_dtype="bfloat16", activation_checkpointing=True),
}


def run_one(args) -> None:
    """One variant in this process (Lightning starts the other ranks); rank 0 prints JSON."""
    import lightning as L
    import torch

    sys.path.insert(0, str(ROOT))
    from lit_grpo.datamodules import ShapeWorldDataModule
    from lit_grpo.modules import GRPOModule
    from lit_grpo.modules.sharding import ShardingSettings
    from lit_grpo.policies import LoraSettings, TinyEditPolicy
    from lit_grpo.rewards import BackgroundReward, TranslationReward

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    L.seed_everything(0, verbose=False)
    settings = VARIANTS[args.one]
    policy = TinyEditPolicy(width=args.width, depth=args.depth, heads=args.heads)
    module = GRPOModule(
        policy,
        [TranslationReward(), BackgroundReward()],
        lora=LoraSettings(rank=16, alpha=16),
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        sharding=ShardingSettings(**settings) if settings else None,
    )
    if settings is None:
        strategy = "ddp" if args.devices > 1 else "auto"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    clock = Clock()
    trainer = L.Trainer(
        accelerator="auto",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    data = ShapeWorldDataModule(
        resolution=args.resolution,
        batch_size=args.batch_size,
        tasks=["translate"],
        train_size=args.batch_size * args.devices * args.steps,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, data)
    if not trainer.is_global_zero:
        return
    timed = clock.times[1:] or clock.times
    if torch.cuda.is_available():
        peak, device = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.get_device_name()
    else:
        peak, device = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "cpu"
    result = {
        "variant": args.one,
        "device": device,
        "ranks": trainer.world_size,
        "step_s": sum(timed) / len(timed),
        "peak_mib": peak,
        "sharded": module.is_sharded,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2, help="conditions per rank")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="GRPO iterations (1 warm-up)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)
    rows = []
    for variant in args.variants:
        argv = [a for a in sys.argv[1:] if not a.startswith("--variants")]
        argv = [a for a in argv if a not in VARIANTS]  # the values of --variants
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", variant]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{variant}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    if not rows:
        sys.exit(1)
    first = rows[0]
    print(
        f"\nGRPO step, editor width {args.width} depth {args.depth}, {args.resolution} px, "
        f"{args.batch_size} conditions x G={args.group_size} per rank, {args.sample_steps} "
        f"SDE steps; {first['ranks']} rank(s) on {first['device']}\n"
    )
    print("| variant | sharded | step (s) | peak memory, rank 0 (MiB) |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['sharded']} | {r['step_s']:.3f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
