"""`last.ckpt` that really is the last state of the run."""

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a final `last.ckpt` when training stops between saves.

    Lightning writes `last` only next to a regular save (after validation here), and at the
    end of training only if no `last` was ever written. A run stopped by `max_time` (or by
    `max_steps` between two validations) would lose the steps since the last validation;
    this subclass saves them.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
