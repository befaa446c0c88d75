"""Throughput and FLOP utilisation per phase of a training step, as a callback.

Logged every training step (per device; `pl_module.log`, so to any logger):

    throughput/step_sec, throughput/images_per_sec
    throughput/{phase}_sec, throughput/{phase}_tflops      achieved, per phase
    throughput/tflops                                      the whole step
    throughput/{phase}_mfu, throughput/mfu                 achieved / peak, when a peak is known

The protocol a LightningModule offers to use it (both optional; nothing else is used):

    callback.set_phase(phase: str)      the module calls it on every callback that has it when
                                        a phase of its step begins, and with "idle" when no
                                        phase runs (between phases, and when the step's work
                                        is done; idle time counts in the step only). Without
                                        it the step is one phase, "step".
    samples_per_step(batch) -> int      the samples (images) one step makes on this device;
                                        without it, the first dimension of the batch (its
                                        first tensor, for a dict, list or tuple).

FLOPs are counted once, on training step `count_step` (the first by default), with
`torch.utils.flop_counter.FlopCounterMode`, split at the phase boundaries: PyTorch's formula
FLOPs of the matrix products, convolutions and attention that ran, forward and backward
(element-wise ops count 0). Later steps are assumed to run the same shapes (a schedule
that changes the work per step, such as a moving early-exit step, makes them stale), and
the counting step itself is not timed (the counter slows it down). Under activation
checkpointing the recomputed forward pass counts too: the update's figure is then what the
hardware executed, not the model FLOPs that MFU usually means.

Timing: on a CUDA device, CUDA events recorded at the step's start, at every phase boundary
and at its end, read in `on_train_batch_end` (which waits once per step, after its work, for
the last event; nothing inside the step waits); elsewhere the wall clock.

MFU divides the achieved rate by `peak_tflops`, or, when it is None, by the dense bf16/fp16
Tensor Core peak of the CUDA device named in `PEAK_TFLOPS` (vendor datasheets) when the
Trainer computes in bf16 or fp16; otherwise MFU is not logged.
"""

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

# dense (no sparsity) bf16 / fp16 Tensor Core peaks in TFLOP/s, from NVIDIA's datasheets;
# the first entry whose key is in the lower-cased device name wins
PEAK_TFLOPS = {
    "h100 pcie": 756.0,
    "h100 nvl": 835.0,
    "h200 nvl": 835.0,
    "h100": 989.0,
    "h200": 989.0,
    "gh200": 989.0,
    "b200": 2250.0,
    "a100": 312.0,
    "l40s": 362.0,
}


class ThroughputMonitor(Callback):
    """Images per second, achieved TFLOP/s and MFU per phase of a training step (see the
    module docstring for what is logged and the protocol).

    Args:
        peak_tflops: the device's peak for MFU; None looks it up (`PEAK_TFLOPS`) for bf16 /
            fp16 training on a known CUDA device, and leaves MFU out otherwise.
        count_step: the training step (0-based) whose FLOPs are counted; it is not timed.
    """

    def __init__(self, peak_tflops: float | None = None, count_step: int = 0):
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (or None to look it up), got {peak_tflops}")
        if count_step < 0:
            raise ValueError(f"count_step must be >= 0, got {count_step}")
        self.peak_tflops, self.count_step = peak_tflops, count_step
        self.flops: dict[str, int] | None = None  # per phase, once counted
        self.last: dict[str, float] = {}  # the last step's logged values
        self._steps = 0
        self._cuda = False
        self._counter = None
        self._counted = 0
        self._marks: list[tuple[str | None, Any]] = []  # (phase starting here, time or event)

    # --- the phase protocol ---------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        if not self._marks:  # outside a training step (validation, a probe before it)
            return
        self._mark(None if phase == "idle" else phase)

    # --- Lightning hooks ------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._cuda = pl_module.device.type == "cuda"
        self._marks = []
        if self._steps == self.count_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
            self._counted = 0
            self.flops = {}
        self._mark("step")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._mark(None)
        marks, self._marks = self._marks, []
        self._steps += 1
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
            return
        seconds = self._seconds(marks)
        step = seconds.pop("__step__")
        samples = _samples(pl_module, batch)
        values = {"step_sec": step, "images_per_sec": samples / max(step, 1e-12)}
        values.update({f"{phase}_sec": s for phase, s in seconds.items()})
        peak = self._peak(trainer, pl_module)
        if self.flops is not None:
            rates = {p: self.flops.get(p, 0) / max(s, 1e-12) / 1e12 for p, s in seconds.items()}
            rates[""] = sum(self.flops.values()) / max(step, 1e-12) / 1e12
            for phase, rate in rates.items():
                key = f"{phase}_" if phase else ""
                values[f"{key}tflops"] = rate
                if peak is not None:
                    values[f"{key}mfu"] = rate / peak
        self.last = values
        for key, value in values.items():
            pl_module.log(f"throughput/{key}", value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_counting()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._stop_counting()

    def _stop_counting(self) -> None:
        if self._counter is not None:  # stopped inside the counting step
            self._counter.__exit__(None, None, None)
            self._counter = None

    # --- the pieces -----------------------------------------------------------------------
    def _mark(self, phase: str | None) -> None:
        """A boundary: the running phase ends here and `phase` (None: no phase) begins."""
        if self._counter is not None:
            total = self._counter.get_total_flops()
            running = self._marks[-1][0] if self._marks else None
            if running is not None:
                self.flops[running] = self.flops.get(running, 0) + total - self._counted
            self._counted = total
        self._marks.append((phase, self._now()))

    def _now(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, marks: list[tuple[str | None, Any]]) -> dict[str, float]:
        """Seconds per phase between the marks, and the whole step under "__step__"."""

        def between(a, b) -> float:
            return a.elapsed_time(b) / 1000.0 if self._cuda else b - a

        if self._cuda:
            marks[-1][1].synchronize()
        out: dict[str, float] = {"__step__": between(marks[0][1], marks[-1][1])}
        for (phase, start), (_, end) in zip(marks, marks[1:]):
            if phase is not None and not (phase == "step" and len(marks) > 2):
                out[phase] = out.get(phase, 0.0) + between(start, end)
        return out

    def _peak(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops
        if pl_module.device.type != "cuda" or "16" not in str(trainer.precision):
            return None  # bf16 / fp16 peaks only: fp32 and tf32 run at other rates
        name = torch.cuda.get_device_name(pl_module.device).lower()
        return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _samples(pl_module: LightningModule, batch: Any) -> int:
    fn = getattr(pl_module, "samples_per_step", None)
    if callable(fn):
        return int(fn(batch))
    while isinstance(batch, (dict, list, tuple)):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else len(batch)
