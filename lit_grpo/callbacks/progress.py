"""Progress bars: one that shows which phase of a step is running (sampling, rewards,
update), and Lightning's rich bar without its `Epoch 0/-2` on a `max_steps` run.

Protocol: the module calls `set_phase(name)` on the bar (lit_grpo's stages call it on every
callback that has the method); any bar without that method is left alone.
"""

from lightning.pytorch.callbacks import RichProgressBar as LightningRichProgressBar
from lightning.pytorch.callbacks import TQDMProgressBar


class PhaseProgressBar(TQDMProgressBar):
    """TQDM bar whose description reads e.g. `Epoch 0 [sampling]`."""

    def set_phase(self, phase: str) -> None:
        bar = self._train_progress_bar
        if bar is not None and self.trainer is not None:
            bar.set_description(f"Epoch {self.trainer.current_epoch} [{phase}]", refresh=True)


class RichProgressBar(LightningRichProgressBar):
    """Lightning's rich bar; a run bounded by `max_steps` alone (max_epochs -1) reads
    `Epoch 0`, where Lightning's appends `/{max_epochs - 1}`: `Epoch 0/-2`."""

    def _get_train_description(self, current_epoch: int) -> str:
        if (self.trainer.max_epochs or 0) >= 1:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
