"""The phases of a training step (sampling, rewards, update), announced and timed.

A stage announces each phase to every callback that has a `set_phase(phase)` method (the
phase progress bar shows it, `lit_grpo.callbacks.ThroughputMonitor` times and counts FLOPs
by it), and "idle" whenever no phase runs: when the step is done, and in GRPO between the
rewards and the update, while the host reads whether anything trains (the one value a step
reads back before it logs). `PhaseClock` measures the phases for the module's own
`time/{phase}` logs.

On a GPU the host runs ahead of the device (nothing in a step waits for it), so a wall
clock around a phase would measure how long it took to queue its kernels. `PhaseClock`
therefore records CUDA events there and reads them when the step is logged; on the CPU,
where every op finishes before the next starts, it reads the wall clock.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseClock:
    """Seconds per phase: CUDA events on a CUDA device (read by `seconds`, once the step is
    over), `time.perf_counter` elsewhere. A phase run several times in a step (sampling and
    rewards, chunk after chunk, with `score_chunk`) counts the sum of its runs."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: dict[str, list[list]] = {}  # phase -> [begin, end] of each run
        self.announced: str | None = None  # the phase the callbacks were last told of

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, phase: str) -> None:
        self.marks.setdefault(phase, []).append([self._now(), None])

    def stop(self, phase: str) -> None:
        self.marks[phase][-1][1] = self._now()

    def announce(self, trainer, phase: str) -> None:
        """`announce_phase`, unless `phase` is the one running: the rewards of chunk after
        chunk, their gathering and the advantages are one "rewards" phase to a callback."""
        if phase != self.announced:
            announce_phase(trainer, phase)
            self.announced = phase

    @contextmanager
    def phase(self, trainer, phase: str) -> Iterator[None]:
        """Announce `phase` to the callbacks (`announce`) and time it."""
        self.announce(trainer, phase)
        self.start(phase)
        yield
        self.stop(phase)

    def seconds(self) -> dict[str, float]:
        """Every stopped phase's duration; on a GPU this waits for the last one to finish."""
        out = {}
        for phase, runs in self.marks.items():
            stopped = [(begin, end) for begin, end in runs if end is not None]
            if not stopped:
                continue
            if self.cuda:
                stopped[-1][1].synchronize()
                out[phase] = sum(b.elapsed_time(e) for b, e in stopped) / 1000.0
            else:
                out[phase] = sum(e - b for b, e in stopped)
        return out


def announce_phase(trainer, phase: str) -> None:
    """Tell every callback of `trainer` with a `set_phase` method that `phase` starts."""
    if trainer is None:
        return
    for callback in trainer.callbacks:
        set_phase = getattr(callback, "set_phase", None)
        if callable(set_phase):
            set_phase(phase)
