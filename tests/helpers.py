"""Small modules shared by the callback tests."""

import lightning as L
import torch


class PlainModule(L.LightningModule):
    """A LightningModule with none of the protocols lit_grpo's callbacks look for."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


def plain_loader(n: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(n, 1)))


class SignalAt(L.Callback):
    """Sends `signum` to this very process as training step `step` starts (a user's Ctrl+C,
    a scheduler's SIGTERM), so the signal arrives in the middle of that step."""

    def __init__(self, step: int = 2, signum: int = 15):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os

        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


class LoggingModule(PlainModule):
    """PlainModule that logs its loss each step and validates (for metric-history tests)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).sum())


class SleepAt(L.Callback):
    """Sleeps `seconds` as training step `step` starts: a step that takes that long (a huge
    group, a stuck reward), printing `sleeping` first so that a test can time a signal."""

    def __init__(self, step: int = 2, seconds: float = 600.0):
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        if trainer.global_step == self.step - 1:
            print("sleeping", flush=True)
            time.sleep(self.seconds)


class StopAt(L.Callback):
    """Stops the run after step `step` through `trainer.should_stop`, as `max_time` and early
    stopping do."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True
