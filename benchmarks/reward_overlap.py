"""Seconds per GRPO step with the rewards in-process, remote, and remote overlapped with
sampling (issue 25), against a reward server of artificial latency.

    OMP_NUM_THREADS=1 python benchmarks/reward_overlap.py            # 30 paired repetitions
    python benchmarks/reward_overlap.py --reps 10 --rounds 1 --steps 6  # and whole fits
    python benchmarks/reward_overlap.py --score-chunk 1     # 8 chunks of one condition

The benchmark starts `python -m lit_grpo serve-rewards` on a free port of 127.0.0.1 (its own
process), serving `SleepyTranslation` (TranslationReward that sleeps `latency` seconds per
step's worth of rollouts, pro rata: a chunk of 1/C of the rollouts sleeps latency / C, as
a batched judge's time grows with its rows) and `BackgroundReward`; it stops the server on
leaving, whatever happens. Variants, each a `GRPOModule` with the embedded editor (random
weights, LoRA r4):

- `in-process`:            TranslationReward + BackgroundReward in the trainer (no latency);
- `remote`:                the served rewards (the step waits `latency` on the server);
- `in-process chunked`:    the conditions in chunks of `--score-chunk` sizes, in-process
                           (what chunking alone costs: smaller policy batches);
- `remote chunked`:        the same chunks, served, scored in turn;
- `remote overlapped`:     the same chunks, each scored in the worker thread while the next
                           one samples (`overlap_scoring`).

First, the step's sampling and rewards phases alone (`sample_and_score`, what
`training_step` runs before the advantages; the update does not touch the rewards), each
variant a module of its own on one batch, `--reps` repetitions with the variants taken in
turn in each (paired: a drift of the machine's speed falls on all alike; on these 2 cores
one step's sampling varies by +-20% from one repetition to the next). Then `--rounds`
whole fits of each variant (taken in turn) of `--steps` GRPO iterations (the first is
warm-up, not timed), the update included.

Printed: `hidden`, 1 - (remote overlapped - in-process) / (remote - in-process), the share
of what the server costs the step that overlapping hides, chunking's own cost included;
and the share of the chunks' reward time hidden, 1 - (remote overlapped - in-process
chunked) / (remote chunked - in-process chunked), with bootstrap 95% intervals over the
repetitions. The whole fits print seconds per step and their sampling and rewards phases
(`time/sampling` + `time/rewards`, the module's own clock). The
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


def grpo_module(args, rewards, score_chunk=None, overlap=False):
    """The benchmark's GRPOModule: the embedded editor (random weights, LoRA r4)."""
    from lit_grpo.modules import GRPOModule
    from lit_grpo.policies import LoraSettings, TinyEditPolicy

    return GRPOModule(
        TinyEditPolicy(width=args.width, depth=args.depth, heads=4),
        rewards,
        lora=LoraSettings(rank=4, alpha=4),
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        score_chunk=score_chunk,
        overlap_scoring=overlap,
    )


def step_seconds(args, rewards, score_chunk=None, overlap=False) -> list[tuple[float, float]]:
    """(seconds of the step, of its sampling and rewards phases) of each timed GRPO step
    (after the warm-up) of a fit with `rewards`."""
    import lightning as L

    from lit_grpo.datamodules import ShapeWorldDataModule

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
    module = grpo_module(args, rewards, score_chunk, overlap)
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


def phase_seconds(args, variants: dict, reps: int) -> dict[str, list[tuple]]:
    """Seconds of the sampling and rewards phases of one GRPO step (`sample_and_score`, what
    `training_step` runs before the advantages) for each variant, `reps` times, the variants
    taken in turn within each repetition (rotated, so none always runs first): a drift of
    the machine's speed falls on all of them alike, and the differences are paired. Every
    variant has its own module built from the same seed, on the same batch of conditions.
    `variants`: name -> (rewards, score_chunk, overlap). Each repetition's (seconds, of
    which sampling, of which rewards: with overlap, the wait for what sampling did not
    hide)."""
    from lit_grpo.datamodules import ShapeWorldDataModule
    from lit_grpo.modules.chunked_scoring import sample_and_score
    from lit_grpo.modules.phases import PhaseClock

    data = ShapeWorldDataModule(
        resolution=args.resolution, batch_size=args.batch_size, tasks=["translate"]
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    modules = {}
    for name, (rewards, chunk, overlap) in variants.items():
        torch.manual_seed(0)
        modules[name] = grpo_module(args, rewards, chunk, overlap)
    names = list(modules)
    seconds = {name: [] for name in names}
    for rep in range(reps + 1):  # the first repetition warms up, not timed
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            module = modules[name]
            module._generator = torch.Generator().manual_seed(rep)
            chunk, overlap = module.hparams.score_chunk, module.hparams.overlap_scoring
            clock = PhaseClock(torch.device("cpu"))
            start = time.perf_counter()
            sample_and_score(module, batch, chunk, overlap, clock)
            if rep:
                took = clock.seconds()
                seconds[name].append(
                    (time.perf_counter() - start, took["sampling"], took["rewards"])
                )
    return seconds


def paired_summary(phases: dict[str, list[tuple]], latency: float) -> None:
    """Mean seconds of each variant and its paired difference to `in-process` (95%
    intervals, t over the repetitions), its sampling and rewards phases apart; the shares
    of the server's cost that overlapping hides, with bootstrap 95% intervals over the
    repetitions, and the same from the rewards phases alone (the overlap's wait against the
    same chunks scored in turn: free of sampling's jitter, blind to any slowing of
    sampling by the worker, which the sampling column shows)."""
    import random
    import statistics

    seconds = {name: [total for total, _, _ in rows] for name, rows in phases.items()}
    base = seconds["in-process"]
    n = len(base)
    # Student's t, two-sided 95%, for n - 1 degrees of freedom (1.96 beyond the table)
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    t = t.get(n - 1, 2.23 if n <= 11 else 2.09 if n <= 21 else 2.04 if n <= 31 else 1.96)

    def interval(values):
        return statistics.fmean(values), t * statistics.stdev(values) / len(values) ** 0.5

    print("| variant | s (sampling + rewards) | vs in-process (paired) | sampling | rewards |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in seconds.items():
        mean, half = interval(values)
        diff, dhalf = interval([v - b for v, b in zip(values, base)])
        sampling = statistics.fmean(s for _, s, _ in phases[name])
        rewards = statistics.fmean(r for _, _, r in phases[name])
        print(
            f"| {name} | {mean:.3f} ± {half:.3f} | {diff:+.3f} ± {dhalf:.3f} | "
            f"{sampling:.3f} | {rewards:.3f} |"
        )

    def hidden(rows, served, base_name):
        cost = statistics.fmean(seconds[served][i] - seconds[base_name][i] for i in rows)
        left = statistics.fmean(
            seconds["remote overlapped"][i] - seconds[base_name][i] for i in rows
        )
        return 1 - left / cost if cost > 0 else float("nan")

    rng = random.Random(0)
    every = list(range(n))
    for served, base_name, what in (
        (
            "remote",
            "in-process",
            f"the server's cost ({latency:g} s of latency; chunking's own cost included)",
        ),
        ("remote chunked", "in-process chunked", "the same chunks' reward time"),
    ):
        point = hidden(every, served, base_name)
        boot = sorted(
            hidden([rng.randrange(n) for _ in every], served, base_name) for _ in range(2000)
        )
        low, high = boot[50], boot[1949]
        print(f"overlap hides {point:.0%} [{low:.0%}, {high:.0%}] of {what}")
    waits = {name: [r for _, _, r in rows] for name, rows in phases.items()}
    served = [a - b for a, b in zip(waits["remote chunked"], waits["in-process chunked"])]
    left = [a - b for a, b in zip(waits["remote overlapped"], waits["in-process chunked"])]
    slower = [a[1] - b[1] for a, b in zip(phases["remote overlapped"], phases["remote chunked"])]
    cost, wait = statistics.fmean(served), statistics.fmean(left)
    mean, half = interval(slower)
    print(
        f"rewards phases alone: the chunks' served rewards cost {cost:.3f} s in turn, the "
        f"overlap waits {wait:.3f} s for them: {1 - wait / cost:.0%} hidden; sampling beside "
        f"the worker {mean:+.3f} ± {half:.3f} s against the same chunks in turn"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument(
        "--reps", type=int, default=30, help="paired repetitions of the phases (0: none)"
    )
    parser.add_argument("--steps", type=int, default=6, help="GRPO iterations a fit (1 warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=0, help="whole fits of each variant, in turn (0: none)"
    )
    args = parser.parse_args()
    if args.reps == 1:
        parser.error("--reps: 0 or at least 2 (an interval needs two repetitions)")

    from lit_grpo.modules.chunked_scoring import chunk_sizes
    from lit_grpo.rewards import BackgroundReward, RemoteReward

    rows = args.batch_size * args.group_size
    sizes = chunk_sizes(args.batch_size, args.score_chunk)
    chunks, last = len(sizes), sizes[-1] / args.batch_size
    print(
        f"{args.batch_size} conditions x {args.group_size} rollouts a step, "
        f"{args.sample_steps} sampling steps, {args.resolution} px, editor width {args.width} "
        f"depth {args.depth}; server latency {args.latency:g} s a step; score_chunk "
        f"{sizes} ({chunks} chunks); torch threads {torch.get_num_threads()}"
    )
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

            def local():
                return [TranslationReward(), BackgroundReward(weight=0.5)]

            def remote():
                return [RemoteReward(server.url)]

            chunk = args.score_chunk
            variants = {  # name: (rewards, score_chunk, overlap_scoring)
                "in-process": (local, None, False),
                "remote": (remote, None, False),
                "in-process chunked": (local, chunk, False),
                "remote chunked": (remote, chunk, False),
                "remote overlapped": (remote, chunk, True),
            }
            phases = {}
            if args.reps:
                phases = phase_seconds(
                    args, {k: (r(), c, o) for k, (r, c, o) in variants.items()}, args.reps
                )
            # whole fits: the step with its update; rounds interleave the variants
            fits = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, (rewards, chunk_, overlap) in variants.items():
                    fits[name] += step_seconds(args, rewards(), chunk_, overlap)
        finally:
            server.close()
    if phases:
        print(
            f"\nThe step's sampling and rewards phases, {args.reps} paired repetitions "
            "(95% intervals):\n"
        )
        paired_summary(phases, args.latency)
        print(
            f"(at most {1 - last:.0%}: the last chunk, {last:.0%} of the conditions, is "
            "never hidden, and the others only where each is scored within the next one's "
            "sampling)"
        )
    if args.rounds:
        n = len(fits["in-process"])
        print(f"\nWhole GRPO steps in fits ({n} timed steps each, the update included):\n")
        print("| variant | s / step | vs in-process | sampling + rewards s | vs in-process |")
        print("| --- | --- | --- | --- | --- |")
        mean = {k: sum(t for t, _ in v) / len(v) for k, v in fits.items()}
        part = {k: sum(p for _, p in v) / len(v) for k, v in fits.items()}
        for name in mean:
            step, before = mean[name], part[name]
            d_step, d_before = step - mean["in-process"], before - part["in-process"]
            print(f"| {name} | {step:.3f} | {d_step:+.3f} | {before:.3f} | {d_before:+.3f} |")


if __name__ == "__main__":
    main()
