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
