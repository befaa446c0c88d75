"""`Frozen`: a judge network held outside the module tree (LPIPS's AlexNet, CLIP)."""

from __future__ import annotations

import torch
from torch import nn


class Frozen:
    """A frozen judge network (plus whatever it needs) held outside the module tree.

    Why: its weights come from their own file. Kept out of `state_dict`, a LightningModule that
    owns the metric or reward neither checkpoints them (a CLIP ViT-L would add 1.7 GB to every
    checkpoint) nor fails to load checkpoints written without it, and no optimiser sees its
    parameters. Copies of the owner (`clone`, `for_task`, an EMA copy of the module) share
    it; it moves to the images' device on use.
    """

    def __init__(self, net: nn.Module, **extras) -> None:
        self.net = net.eval().requires_grad_(False)
        self.__dict__.update(extras)

    def on(self, device: torch.device) -> nn.Module:
        return self.net.to(device)

    def __deepcopy__(self, memo: dict) -> Frozen:
        return self
