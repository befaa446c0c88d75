"""LPIPS (AlexNet) between the source and the edit, outside the edited object's regions.

The network is torchmetrics' LPIPS (`LearnedPerceptualImagePatchSimilarity(net_type="alex")`):
its linear heads ship in the torchmetrics wheel; its AlexNet backbone is torchvision's
ImageNet checkpoint, which torchmetrics downloads into `$TORCH_HOME/hub/checkpoints/`. Here
the backbone is read from a local file and nothing is ever downloaded: torchmetrics' network is
built with a random backbone (`pnet_rand=True`, the same `_NoTrainLpips` its metric class
builds) and the file is loaded into it.

Departures from plain LPIPS(source, edit), and why:
- `region="background"` (default) compares the source with the edit whose object regions
  (true before/after masks, grown by `dilate` px) are pasted back from the source, so only
  changes to the rest of the scene count: a perfect edit scores exactly 0, like background
  L1. Whole-image LPIPS (`region="image"`) also scores the instructed change itself, so it
  mixes scene preservation with edit size.
- Images smaller than `min_size` are upsampled (bilinear). AlexNet needs at least 31 px: its
  second max-pool has nothing left to pool below that. At ShapeWorld's 32 px it runs, but its
  last three layers are 1x1 (global features); LPIPS was calibrated on 64 px patches, so
  `min_size=64` is the choice for numbers comparable across resolutions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torchmetrics.functional.image.lpips import _NoTrainLpips

from lit_grpo.metrics.base import EditMetric, Frozen
from lit_grpo.metrics.spatial import object_regions
from lit_grpo.perception import geometry as geo

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
ALEXNET_MIN_SIZE = 31


def alexnet_weights(path: str | os.PathLike | None = None) -> Path:
    """The AlexNet backbone file: `path` if given, else torch.hub's checkpoint directory
    ($TORCH_HOME/hub/checkpoints/). Raises FileNotFoundError naming the file looked for."""
    default = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    file = Path(path).expanduser() if path is not None else default
    if not file.is_file():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's AlexNet weights and found no file at {file}. Either pass "
            f"`weights=<path to {ALEXNET_FILE}>` or place the file at {default} (torch.hub's "
            f"checkpoint directory, under $TORCH_HOME). It is {ALEXNET_URL}; lit_grpo never "
            "downloads it."
        )
    return file


def load_lpips_alex(weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """torchmetrics' LPIPS network with the AlexNet backbone read from `alexnet_weights(weights)`."""
    file = alexnet_weights(weights)
    net = _NoTrainLpips(net="alex", pnet_rand=True)  # heads from the wheel, random backbone
    state = torch.load(file, map_location="cpu", weights_only=True)
    # torchmetrics splits `alexnet.features` into slices that keep the layer indices as names:
    # slice2.3.weight is features.3.weight
    backbone = net.net
    try:
        backbone.load_state_dict(
            {k: state["features." + k.split(".", 1)[1]] for k in backbone.state_dict()}
        )
    except (KeyError, RuntimeError) as err:
        raise ValueError(
            f"{file} is not a torchvision AlexNet state dict ({ALEXNET_FILE}): {err}"
        ) from err
    return net


class LPIPS(EditMetric):
    """Mean LPIPS (AlexNet) of the edit against the source; lower is better, 0 = identical.

    Args:
        weights: AlexNet backbone file; None looks in $TORCH_HOME/hub/checkpoints/.
        task: score only this task's edits (None: all).
        region: "background" (object regions pasted back from the source) or "image".
        min_size: smaller images are upsampled to this side (>= 31, AlexNet's minimum).
        dilate: px by which the object regions grow (as for background L1).
    """

    higher_is_better = False

    def __init__(
        self,
        weights: str | None = None,
        task: str | None = None,
        region: Literal["background", "image"] = "background",
        min_size: int = 32,
        dilate: int = 1,
    ) -> None:
        super().__init__(task)
        if region not in ("background", "image"):
            raise ValueError(f"region must be 'background' or 'image', got {region!r}")
        if min_size < ALEXNET_MIN_SIZE:
            raise ValueError(f"min_size must be >= {ALEXNET_MIN_SIZE} (AlexNet), got {min_size}")
        self.region, self.min_size, self.dilate = region, min_size, dilate
        self.judge = Frozen(load_lpips_alex(weights))

    def values(self, source: Tensor, edited: Tensor, batch: Mapping, before, after) -> Tensor:
        if self.region == "background":
            keep = geo.outside_mask(object_regions(batch, before, after), self.dilate)
            edited = torch.where(keep[:, None], edited, source)
        net = self.judge.on(source.device)
        a, b = self._resize(source.float()), self._resize(edited.float())
        return net(a, b, normalize=True).flatten()  # normalize: inputs in [0, 1]

    def _resize(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if min(h, w) >= self.min_size:
            return images
        scale = self.min_size / min(h, w)
        size = (max(round(h * scale), self.min_size), max(round(w * scale), self.min_size))
        return torch.nn.functional.interpolate(images, size, mode="bilinear", align_corners=False)
