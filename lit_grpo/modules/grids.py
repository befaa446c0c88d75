"""Image grids for logging: one row per edit, columns source | target | edit(s)."""

import torch
from torch import Tensor


def edit_grid(*columns: Tensor, pad: int = 1, scale: int = 4) -> Tensor:
    """Columns of [N, 3, H, W] images in [0, 1] -> one uint8 image [H', W', 3].

    Upscaled by `scale` with nearest-neighbour so 32 px edits stay readable in a viewer.
    """
    n, _, h, w = columns[0].shape
    cols = len(columns)
    grid = torch.ones(3, n * (h + pad) + pad, cols * (w + pad) + pad)
    for j, images in enumerate(columns):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y : y + h, x : x + w] = images[i].detach().float().cpu().clamp(0, 1)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8)
