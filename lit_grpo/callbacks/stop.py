"""Stop on SIGINT / SIGTERM at the end of the current step, with a checkpoint to resume from;
at once when the step overruns a deadline or a second signal comes."""

import os
import signal
import sys
import threading
from pathlib import Path

import lightning as L

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(L.Callback):
    """On SIGINT (Ctrl+C) or SIGTERM (a scheduler's preemption), finish the current training
    step, save `last.ckpt` and stop; if that takes more than `deadline` seconds, or a second
    signal comes, stop at once.

    The decision is taken at the end of a step, on every rank together (any rank's signal
    stops all); the validation Lightning would add before stopping is skipped unless it was
    due at that step anyway. `last.ckpt` goes to the checkpoint callback's folder: written
    there by `lit_grpo.callbacks.ModelCheckpoint(save_last=True)` at the end of training,
    else by this callback (`<default_root_dir>/checkpoints` without a checkpoint callback).
    The loggers end their run as KILLED (MLflow's status for it; `finalize("KILLED")`), and
    `python -m lit_grpo fit` exits with 128 + the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a shell reports a process a signal ended, so that `fit && export` does not
    go on with a half-trained model. Resume with `--ckpt_path` (see docs/reliability.md).

    Stopping at once (the deadline passed, or a second signal): the loggers end the run as
    KILLED, one line says why, and the process exits with 128 + the signal there and then
    (`os._exit`: from a watchdog thread, even while the main thread is inside a long torch
    call). The step in flight is lost; checkpoints already written stay whole (a write cut
    short leaves only a stray `.<name>.partial`, see `AtomicCheckpointIO`).

    Args:
        deadline: seconds from the first signal to the end of the stop (the step, its
            checkpoint); keep it under the grace period of the scheduler that sends SIGTERM
            (SLURM's `--signal=TERM@120` gives 120 s, Kubernetes 30 s by default).

    Lightning's own SIGTERM handling is replaced while training runs: it ends the run as
    FAILED and the process with exit code 0. The previous handlers are restored afterwards.
    """

    def __init__(self, deadline: float = 60.0):
        if deadline <= 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline}")
        self.deadline = deadline
        self.received: int | None = None  # the signal that stopped the run, if any
        self._pending: int | None = None
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None
        self._trainer = None

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning installed its SIGTERM handler (Trainer._run), so ours replaces it
        self.received, self._pending, self._trainer = None, None, trainer
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._pending is not None:
            self._stop_now(signum, "a second signal")
        self._pending = signum
        # a thread, so that it fires even while the main thread is inside one long torch call
        self._watchdog = threading.Timer(
            self.deadline,
            self._stop_now,
            (signum, f"the run did not stop within {self.deadline:g} s (StopOnSignal deadline)"),
        )
        self._watchdog.daemon = True
        self._watchdog.start()

    def _stop_now(self, signum: int, why: str) -> None:
        """End the loggers' run as KILLED and the process with 128 + `signum`, now."""
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else "?"
        print(
            f"{signal.Signals(signum).name}: {why}: stopped at once after step {step}, "
            "losing the work since the last checkpoint; resume with --ckpt_path",
            file=sys.stderr,
            flush=True,
        )
        for logger in trainer.loggers if trainer is not None else ():
            try:
                logger.finalize("KILLED")
            except Exception as err:  # the exit must not wait on a logger that fails
                print(f"{type(logger).__name__} could not end its run: {err}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._pending or 0
        if trainer.world_size > 1:
            import torch

            signum = int(trainer.strategy.reduce(torch.tensor(float(signum)), reduce_op="max"))
        if signum:
            self.received = signal.Signals(signum).value
            _skip_unscheduled_validation(trainer)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        # the handlers stay ours until teardown: a second signal during the save stops at once
        if self.received is None:
            return
        from lit_grpo.callbacks.checkpoint import ModelCheckpoint

        ckpt = trainer.checkpoint_callback
        if not (isinstance(ckpt, ModelCheckpoint) and ckpt.save_last):  # it saves last.ckpt
            folder = Path(ckpt.dirpath) if ckpt and ckpt.dirpath else None
            folder = folder or Path(trainer.default_root_dir) / "checkpoints"
            trainer.save_checkpoint(folder / "last.ckpt")
        name = signal.Signals(self.received).name
        L.pytorch.utilities.rank_zero_info(
            f"{name}: stopped after step {trainer.global_step}; resume with --ckpt_path"
        )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
        if self.received is not None:
            for logger in trainer.loggers:
                logger.finalize("KILLED")
        self._disarm()  # the stop is complete

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog, self._trainer = None, None

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped the run, 0 if none did."""
        return 128 + self.received if self.received else 0


def _skip_unscheduled_validation(trainer) -> None:
    """Lightning validates once more when a callback stops the run; a stop should not pay
    for a validation that was not due at this step (its checkpoint, written before Lightning
    counts the step for the loggers, is also what `ModelCheckpoint` has to correct)."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None or not hasattr(loop, "_skip_next_val"):
        return  # another Lightning: it validates, and the stop takes that much longer
    if not loop._should_check_val_fx(fetcher):  # asked before should_stop forces it
        loop._skip_next_val = True
