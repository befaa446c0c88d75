"""Stop on SIGINT / SIGTERM at the end of the current step, with a checkpoint to resume from."""

import signal
from pathlib import Path

import lightning as L

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(L.Callback):
    """On SIGINT (Ctrl+C) or SIGTERM (a scheduler's preemption), finish the current training
    step, save `last.ckpt` and stop; a second SIGINT aborts at once.

    The decision is taken at the end of a step, on every rank together (any rank's signal
    stops all). `last.ckpt` goes to the checkpoint callback's folder: written there by
    `lit_grpo.callbacks.ModelCheckpoint(save_last=True)` at the end of training, else by this
    callback (`<default_root_dir>/checkpoints` without a checkpoint callback). The loggers
    end their run as KILLED (MLflow's status for it; `finalize("KILLED")`), and
    `python -m lit_grpo fit` exits with 128 + the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a shell reports a process a signal ended, so that `fit && export` does not
    go on with a half-trained model. Resume with `--ckpt_path` (see docs/reliability.md).

    Lightning's own SIGTERM handling is replaced while training runs: it ends the run as
    FAILED and the process with exit code 0. The previous handlers are restored afterwards.
    """

    def __init__(self):
        self.received: int | None = None  # the signal that stopped the run, if any
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning installed its SIGTERM handler (Trainer._run), so ours replaces it
        self.received, self._pending = None, None
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._pending == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self._pending = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._pending or 0
        if trainer.world_size > 1:
            import torch

            signum = int(trainer.strategy.reduce(torch.tensor(float(signum)), reduce_op="max"))
        if signum:
            self.received = signal.Signals(signum).value
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
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

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped the run, 0 if none did."""
        return 128 + self.received if self.received else 0
