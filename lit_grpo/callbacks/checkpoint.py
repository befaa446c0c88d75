"""`last.ckpt` that really is the last state of the run, and never half written."""

import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing each file whole or not at all.

    The checkpoint goes to a hidden `.<name>.partial` beside its target, is flushed to disk,
    then renamed over the target with `os.replace` (atomic within a folder on POSIX and
    Windows). A run killed mid-write leaves the previous `last.ckpt` intact (and at worst a
    stray `.partial`); Lightning's own write goes through a temporary file in the system's
    temp folder and a move, which is a copy, and so not atomic, when that folder is on another
    file system. Remote paths (`s3://...`) keep Lightning's behaviour for writes; every
    load is `weights_only=True`.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as file:
                self.write(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def write(self, checkpoint: dict, file) -> None:
        torch.save(checkpoint, file)

    def load_checkpoint(self, path, *args, weights_only=None, **kwargs) -> dict:
        """Always `weights_only=True`: Lightning's default for an http(s) path is an
        unpickling load, which runs whatever code a booby-trapped file holds."""
        return super().load_checkpoint(path, *args, weights_only=True, **kwargs)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a final `last.ckpt` when training stops between saves,
    and atomic writes.

    Lightning writes `last` only next to a regular save (after validation here), and at the
    end of training only if no `last` was ever written. A run stopped by `max_time` (or by
    `max_steps` between two validations) would lose the steps since the last validation;
    this subclass saves them. It also installs `AtomicCheckpointIO` when the trainer would
    use Lightning's plain `TorchCheckpointIO`, so a kill mid-write never leaves a half-written
    checkpoint.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def load_state_dict(self, state_dict: dict) -> None:
        """Outside `fit` nothing is saved, so the saving state (best k, last path) is of no
        use: only `best_model_path` is read, as Lightning does when the folder changed, and
        without its "dirpath has changed" warning (validate and test log to a new run, so
        their folder always differs from the checkpoint's)."""
        if getattr(self, "_stage", "fit") != "fit":
            self.best_model_path = state_dict["best_model_path"]
            return
        super().load_state_dict(state_dict)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        _count_the_stopped_batch(trainer, checkpoint)


def _count_the_stopped_batch(trainer, checkpoint: dict) -> None:
    """Store the logging step of a checkpoint written by a validation that a stop triggered.

    Lightning logs at `_batches_that_stepped`, which it advances after the validation that
    ends a batch. When a callback stops the run (`trainer.should_stop`: a signal, `max_time`,
    early stopping) Lightning validates once more, unscheduled, and this class saves there,
    before the advance; on resume Lightning adds the missing 1 only after a *scheduled*
    validation. A run resumed from such a checkpoint would log its first step at the
    stopped step's number: every metric of that step twice, the history one step behind.
    """
    loop = trainer.fit_loop.epoch_loop
    if not (trainer.state.fn == "fit" and trainer.validating and trainer.should_stop):
        return
    trainer.should_stop = False  # asks Lightning whether this batch would have validated
    try:
        scheduled = loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    finally:
        trainer.should_stop = True
    if not scheduled and not loop._should_accumulate():
        state = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
        state["_batches_that_stepped"] = loop._batches_that_stepped + 1
