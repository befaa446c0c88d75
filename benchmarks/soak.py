"""Soak test: many cheap GRPO iterations through Lightning, watching memory and NaNs.

    python benchmarks/soak.py --steps 1000

Trains the GRPO stage (`Trainer.fit` with a `GRPOModule` and a `ShapeWorldDataModule`,
logger and checkpoints off) with the embedded editor (the built-in `shapeworld-sft`
weights, LoRA r4) at its cheapest: 16 px, 2 conditions x G = 4 rollouts, 4 sample steps,
translation + background rewards, looping over a 256-sample split. Every `--every` steps it
samples the process RSS; after every step it reads the logged loss and rewards
(`trainer.callback_metrics`) and counts the non-finite ones. Printed: RSS at the start
(after step 10, once allocators and caches have warmed up), the middle and the end, the
growth from start to end, the NaN counts and the seconds per step.

A leak shows as growth that keeps rising with --steps (a few % of noise is allocator
behaviour); a NaN count above 0 means a loss or reward went non-finite somewhere. Run alone:
two torch processes on two cores slow each other down several-fold.
"""

import argparse
import math
import os
import time

import lightning as L
import psutil

START_STEP = 10  # the "start" RSS: after the first steps have allocated what they keep


class Soak(L.Callback):
    """RSS every `every` steps and the non-finite values logged at every step."""

    def __init__(self, every: int):
        self.every = every
        self.process = psutil.Process(os.getpid())
        self.rss: dict[int, float] = {}  # step -> MiB
        self.nonfinite = dict.fromkeys(("train/loss", "reward/total"), 0)
        self.nonfinite_skipped = 0.0
        self.dropped = 0.0
        self.started = self.timed_from = 0.0

    def on_train_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # GRPO iterations done, this one included
        m = trainer.callback_metrics
        for key in self.nonfinite:
            if key in m and not math.isfinite(float(m[key])):
                self.nonfinite[key] += 1
        self.nonfinite_skipped += float(m.get("train/nonfinite_skipped", 0.0))
        self.dropped += float(m.get("groups/dropped_samples", 0.0))
        if step == START_STEP:
            self.timed_from = time.perf_counter()
        if step == START_STEP or step % self.every == 0 or step == trainer.max_steps:
            self.rss[step] = self.process.memory_info().rss / 2**20


def build(args):
    from lit_grpo.datamodules import ShapeWorldDataModule
    from lit_grpo.modules import GRPOModule
    from lit_grpo.policies import LoraSettings, TinyEditPolicy
    from lit_grpo.rewards import BackgroundReward, TranslationReward

    module = GRPOModule(
        TinyEditPolicy(weights=args.weights),
        [TranslationReward(move_fraction=0.25), BackgroundReward()],
        lora=LoraSettings(rank=4, alpha=4),
        group_size=4,
        sample_steps=4,
        eval_steps=2,
        lr=1e-4,
    )
    data = ShapeWorldDataModule(
        resolution=16, batch_size=2, tasks=["translate"], train_size=256, val_size=2
    )
    return module, data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="GRPO iterations")
    parser.add_argument("--every", type=int, default=50, help="sample the RSS every N steps")
    parser.add_argument("--weights", default="shapeworld-sft", help="policy weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps <= START_STEP:
        parser.error(f"--steps must be > {START_STEP}")

    L.seed_everything(args.seed, verbose=False)
    module, data = build(args)
    soak = Soak(args.every)
    trainer = L.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[soak],
    )
    trainer.fit(module, data)
    end = time.perf_counter()

    steps = sorted(soak.rss)
    first, last = steps[0], steps[-1]
    middle = min(steps, key=lambda s: abs(s - (first + last) / 2))
    growth = 100 * (soak.rss[last] - soak.rss[first]) / soak.rss[first]
    per_step = (end - soak.timed_from) / max(trainer.global_step - START_STEP, 1)
    rows = [
        ("GRPO iterations (global_step)", f"{trainer.global_step}"),
        (f"RSS at step {first} (start)", f"{soak.rss[first]:.1f} MiB"),
        (f"RSS at step {middle} (middle)", f"{soak.rss[middle]:.1f} MiB"),
        (f"RSS at step {last} (end)", f"{soak.rss[last]:.1f} MiB"),
        ("RSS growth start -> end", f"{growth:+.1f} %"),
        ("steps with a NaN/inf train/loss", f"{soak.nonfinite['train/loss']}"),
        ("steps with a NaN/inf reward/total", f"{soak.nonfinite['reward/total']}"),
        ("optimiser steps skipped (non-finite)", f"{soak.nonfinite_skipped:.0f}"),
        ("rollouts dropped (non-finite reward)", f"{soak.dropped:.0f}"),
        (f"seconds per step (after step {START_STEP})", f"{per_step:.3f}"),
        ("wall time", f"{end - soak.started:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nGRPO soak: {args.steps} iterations, 16 px, 2 x G=4, 4 sample steps, CPU")
    for key, value in rows:
        print(f"{key:<{width}}  {value:>12}")
    print("\nRSS samples (step: MiB):", ", ".join(f"{s}: {soak.rss[s]:.0f}" for s in steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
