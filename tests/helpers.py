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
