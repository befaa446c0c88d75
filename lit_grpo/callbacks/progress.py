"""A progress bar that shows which phase of a step is running (sampling, rewards, update).

Protocol: the module calls `set_phase(name)` on the bar (lit_grpo's stages call it on every
callback that has the method); any bar without that method is left alone.
"""

from lightning.pytorch.callbacks import TQDMProgressBar


class PhaseProgressBar(TQDMProgressBar):
    """TQDM bar whose description reads e.g. `Epoch 0 [sampling]`."""

    def set_phase(self, phase: str) -> None:
        bar = self._train_progress_bar
        if bar is not None and self.trainer is not None:
            bar.set_description(f"Epoch {self.trainer.current_epoch} [{phase}]", refresh=True)
