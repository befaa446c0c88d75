"""Seconds per GRPO step with the rewards in-process, remote, and remote overlapped with
sampling (issue 25), against a reward server of artificial latency.

    OMP_NUM_THREADS=1 python benchmarks/reward_overlap.py                  # a table
    python benchmarks/reward_overlap.py --latency 0.5 --batch-size 8 --steps 4 --rounds 1
    python benchmarks/reward_overlap.py --score-chunk 1     # 8 chunks of one condition

The benchmark starts `python -m lit_grpo serve-rewards` on a free port of 127.0.0.1 (its own
process), serving `SleepyTranslation` (TranslationReward that sleeps `latency` seconds per
step's worth of rollouts, pro rata: a chunk of 1/C of the rollouts sleeps latency / C, as
a batched judge's time grows with its rows) and `BackgroundReward`; it stops the server on
leaving, whatever happens. Variants, each `--rounds` fits (taken in turn, variant after
variant) of `--steps` GRPO iterations (the first is warm-up, not timed) of `GRPOModule` with the embedded editor (random weights, LoRA r4):

- `in-process`:            TranslationReward + BackgroundReward in the trainer (no latency);
- `remote`:                the served rewards (the step waits `latency` on the server);
- `in-process chunked`:    the conditions in chunks of `--score-chunk` sizes, in-process
                           (what chunking alone costs: smaller policy batches);
- `remote chunked`:        the same chunks, served, scored in turn;
- `remote overlapped`:     the same chunks, each scored in the worker thread while the next
                           one samples (`overlap_scoring`).

Printed: `hidden`, 1 - (remote overlapped - in-process) / (remote - in-process), the share
of what the server costs the step that overlapping hides, chunking's own cost included;
and the share of the chunks' reward time hidden, 1 - (remote overlapped - in-process
chunked) / (remote chunked - in-process chunked). Both for the whole step and for its
sampling and rewards phases (`time/sampling` + `time/rewards`, the module's own clock; the
update, which the rewards do not touch, adds noise to the whole step's differences). The
last chunk's scoring cannot be hidden (nothing samples after it): with C equal chunks at
most 1 - 1/C, if a chunk samples at least as long as it is scored; shrinking chunks
(4, 2, 1, 1) leave the last 1/8 exposed in 4 chunks rather than 8.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lit_grpo

import torch  # noqa: E402

from lit_grpo.rewards import TranslationReward  # noqa: E402


class SleepyTranslation(TranslationReward):
    """TranslationReward that first sleeps `seconds_per_row` per rollout it scores."""

    def __init__(self, seconds_per_row: float = 0.0, weight: float = 1.0):
        super().__init__(weight=weight)
        self.seconds_per_row = seconds_per_row

    def forward(self, inputs):
        time.sleep(self.seconds_per_row * inputs.images.shape[0])
        return super().forward(inputs)


class _Server:
    """`serve-rewards` in a process of its own on 127.0.0.1; `url`; stopped by `close`."""

    def __init__(self, config: str):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        command = [sys.executable, "-m", "lit_grpo", "serve-rewards", "--config", config]
        self.proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()  # the first line, once it listens
        if " on http://127.0.0.1:" not in line:
            self.close()
            raise RuntimeError(f"serve-rewards did not start: {line.strip()}")
        self.url = line.split(" on ")[1].split()[0]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc.stdout.close()


def step_seconds(args, rewards, score_chunk=None, overlap=False) -> list[tuple[float, float]]:
    """(seconds of the step, of its sampling and rewards phases) of each timed GRPO step
    (after the warm-up) of a fit with `rewards`."""
    import lightning as L

    from lit_grpo.datamodules import ShapeWorldDataModule
    from lit_grpo.modules import GRPOModule
    from lit_grpo.policies import LoraSettings, TinyEditPolicy

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
            m = trainer.callback_metrics  # the step's own phase clock
            before_update = float(m["time/sampling"] + m["time/rewards"])
            self.times.append((time.perf_counter() - self.start, before_update))

    L.seed_everything(0, verbose=False)
    module = GRPOModule(
        TinyEditPolicy(width=args.width, depth=args.depth, heads=4),
        rewards,
        lora=LoraSettings(rank=4, alpha=4),
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        score_chunk=score_chunk,
        overlap_scoring=overlap,
    )
    clock = Clock()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
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
        train_size=args.batch_size * args.steps,
    )
    trainer.fit(module, data)
    return clock.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.5, help="server seconds per step")
    parser.add_argument("--batch-size", type=int, default=8, help="conditions per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument(
        "--score-chunk",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[4, 2, 1, 1],
        help="conditions per chunk, in turn, comma-separated (the last size repeats): 1 "
        "is one condition at a time; 4,2,1,1 (default) shrinking chunks of 8 conditions",
    )
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="GRPO iterations (1 warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="fits of each variant, interleaved (in turn)"
    )
    args = parser.parse_args()

    from lit_grpo.rewards import BackgroundReward, RemoteReward

    rows = args.batch_size * args.group_size
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sleepy.yaml"
        config.write_text(
            "rewards:\n"
            "  - class_path: reward_overlap.SleepyTranslation\n"
            f"    init_args: {{seconds_per_row: {args.latency / rows}}}\n"
            "  - class_path: lit_grpo.rewards.BackgroundReward\n"
            "    init_args: {weight: 0.5}\n"
        )
        server = _Server(str(config))
        try:
            local = [TranslationReward(), BackgroundReward(weight=0.5)]
            chunk = args.score_chunk
            variants = {
                "in-process": lambda: step_seconds(args, local),
                "remote": lambda: step_seconds(args, [RemoteReward(server.url)]),
                "in-process chunked": lambda: step_seconds(
                    args, [TranslationReward(), BackgroundReward(weight=0.5)], chunk
                ),
                "remote chunked": lambda: step_seconds(args, [RemoteReward(server.url)], chunk),
                "remote overlapped": lambda: step_seconds(
                    args, [RemoteReward(server.url)], chunk, overlap=True
                ),
            }
            # rounds interleave the variants, so a drift of the machine's speed falls on all
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fit in variants.items():
                    times[name] += fit()
        finally:
            server.close()
    mean = {k: sum(t for t, _ in v) / len(v) for k, v in times.items()}
    part = {k: sum(p for _, p in v) / len(v) for k, v in times.items()}
    from lit_grpo.modules.chunked_scoring import chunk_sizes

    sizes = chunk_sizes(args.batch_size, args.score_chunk)
    chunks, last = len(sizes), sizes[-1] / args.batch_size
    print(
        f"\n{args.batch_size} conditions x {args.group_size} rollouts a step, "
        f"{args.sample_steps} sampling steps, {args.resolution} px, editor width {args.width} "
        f"depth {args.depth}; server latency {args.latency:g} s a step; score_chunk "
        f"{sizes} ({chunks} chunks); {len(times['remote'])} timed steps each; "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print("| variant | s / step | vs in-process | sampling + rewards s | vs in-process |")
    print("| --- | --- | --- | --- | --- |")
    for name in mean:
        step, before = mean[name], part[name]
        d_step, d_before = step - mean["in-process"], before - part["in-process"]
        print(f"| {name} | {step:.3f} | {d_step:+.3f} | {before:.3f} | {d_before:+.3f} |")
    for label, values in (("the step", mean), ("sampling + rewards", part)):
        print(f"\n{label}:")
        for base, served, what in (
            ("in-process", "remote", "the server's cost (chunking's own cost included)"),
            ("in-process chunked", "remote chunked", "the chunks' reward time"),
        ):
            cost = values[served] - values[base]
            left = values["remote overlapped"] - values[base]
            hidden = 1 - left / cost if cost > 0 else 0.0
            print(f"  overlap hides {hidden:.0%} of {what}: {cost:.3f} s")
    print(
        f"(at most {1 - last:.0%}: the last chunk, {last:.0%} of the conditions, is never "
        "hidden, and the others only where each is scored within the next one's sampling)"
    )


if __name__ == "__main__":
    main()
