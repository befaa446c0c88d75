"""Real images from jsonl files: one edit per line, checked up front, batched like ShapeWorld.

A row is a JSON object (docs/data.md):

    {"image": "imgs/0001.jpg", "instruction": "move the mug to the left", "task": "translate",
     "object": "mug", "target": "imgs/0001_left.jpg", "box": [12, 40, 96, 130],
     "mask": "masks/0001.png"}

image, instruction, task (translate | rotate | scale) and object are required; target (the
edited image, for SFT), box (x0, y0, x1, y1 of the object in the source image's pixels, x1/y1
exclusive) and mask (a grey image, non-zero on the object, the source's size) are optional;
other keys are ignored (with a warning naming them). Paths are relative to `image_root`, which
is relative to the jsonl file's folder. The instruction is parsed into the edit-spec fields
ShapeWorld's batches carry (`lit_grpo.datamodules.instructions.parse_instruction`).

Every row is checked when the split is set up, before the first batch: malformed JSON, a
missing key, a missing or unreadable image, target or mask, an unknown task, an instruction
that does not read as its task, a box outside the image. Each problem is reported as
`file:line: what is wrong`; `on_bad_row="error"` stops with all of them listed, "skip" warns
with the count and the lines and trains on the rest.

A batch has ShapeWorld's keys where real data has them (source, instruction, object, task,
direction, angle, factor, index; target, mask_before, box_before when the rows give them)
plus `origin` ("file:line" per row) and `source_path` (the source image's path: the key a
policy caches what it computes from a source by, `EditPolicy.encode_condition`), so
`GRPOModule` trains on it unchanged. Images are
resized (stretched, our choice: every image of a batch must share one size) to `resolution`.
Stored pixels are used as they are: EXIF orientation is not applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lit_grpo.checks import ConfigError
from lit_grpo.datamodules.jsonl_rows import OPTIONAL, REQUIRED, read_rows, report_bad_rows
from lit_grpo.datamodules.resumable import EpochSampler, ResumableLoader
from lit_grpo.datamodules.shapeworld import MAX_RESOLUTION


class JsonlEditDataset(Dataset):
    """The checked rows of one jsonl file, loaded and resized on access.

    Args:
        path: the jsonl file.
        resolution: side (or (H, W)) every image is resized to.
        image_root: folder of the rows' paths, relative to the jsonl's folder.
        on_bad_row: "error" (stop, listing every bad row) or "skip" (warn, leave them out).
        require_target: a row without a target is a bad row (SFT trains on targets).
        check_pixels: decode every distinct image file up front (catches truncated JPEGs;
            off: headers and PNG checksums only, for huge datasets).
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int | tuple[int, int],
        image_root: str = ".",
        on_bad_row: Literal["skip", "error"] = "error",
        require_target: bool = False,
        check_pixels: bool = True,
    ):
        if on_bad_row not in ("skip", "error"):
            raise ConfigError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
        self.path = Path(path)
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        self.resolution = _checked_side(int(h), int(w))
        rows, bad, unknown = read_rows(self.path, image_root, require_target, check_pixels)
        if unknown:
            rank_zero_warn(
                f"{self.path}: ignoring unknown key(s) {sorted(unknown)}; a row has "
                f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}"
            )
        report_bad_rows(bad, len(rows) + len(bad), self.path, on_bad_row)
        if not rows:
            raise ConfigError(f"{self.path} has no usable rows (docs/data.md: the row schema)")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        h, w = self.resolution
        edit = row.edit
        sample = {
            "source": _load_rgb(row.image, (w, h), row.origin),
            "instruction": row.instruction,
            "object": row.object,
            "task": row.task,
            "direction": torch.tensor(edit.direction, dtype=torch.float32),
            "angle": torch.tensor(edit.angle, dtype=torch.float32),
            "factor": torch.tensor(edit.factor, dtype=torch.float32),
            "index": int(index),
            "origin": row.origin,
            "source_path": str(row.image),
        }
        if row.target is not None:
            sample["target"] = _load_rgb(row.target, (w, h), row.origin)
        if row.mask is not None:
            sample["mask_before"] = _load_mask(row.mask, (w, h), row.origin)
        if row.box is not None:
            sx, sy = w / row.size[0], h / row.size[1]
            x0, y0, x1, y1 = row.box
            sample["box_before"] = torch.tensor([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        return sample


def _checked_side(h: int, w: int) -> tuple[int, int]:
    """(h, w) if both are within 1..MAX_RESOLUTION px, else a ConfigError naming the key."""
    if not (1 <= h <= MAX_RESOLUTION and 1 <= w <= MAX_RESOLUTION):
        raise ConfigError(
            f"data.init_args.resolution {h}x{w}: each side must be within 1..{MAX_RESOLUTION} "
            "px (lit_grpo.datamodules.shapeworld.MAX_RESOLUTION: no supported backbone edits "
            "above it)"
        )
    return h, w


def _open(path: Path, origin: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as err:
        raise OSError(f"{origin}: cannot read {path} ({type(err).__name__}: {err})") from None


def _load_rgb(path: Path, size: tuple[int, int], origin: str) -> Tensor:
    """[3, H, W] float in [0, 1], resized to `size` (width, height), bicubic."""
    im = _open(path, origin).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _load_mask(path: Path, size: tuple[int, int], origin: str) -> Tensor:
    """[H, W] bool: non-zero pixels, resized to `size` (width, height), nearest."""
    im = _open(path, origin).convert("L").resize(size, Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(im) > 0)


def collate_rows(samples: list[dict]) -> dict:
    """`default_collate` of the keys every sample has; an optional key (target, mask_before,
    box_before) only some samples have is left out, and `batch["missing"][key]` names the
    rows without it, so a stage that needs it can say which rows to fix."""
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    batch = default_collate([{k: s[k] for k in keys} for s in samples])
    partial = sorted({k for s in samples for k in s} - set(keys))
    if partial:
        batch["missing"] = {k: [s["origin"] for s in samples if k not in s] for k in partial}
    return batch


class JsonlDataModule(L.LightningDataModule):
    """Edits of real images from jsonl files (row schema: module docstring, docs/data.md).

    Args:
        train, val, test: jsonl files of the splits (predict uses test, else val); a split
            left out has no loader.
        image_root: the folder the rows' paths start from, relative to each jsonl's folder.
        resolution: side (or [H, W]) images are resized to, at most `MAX_RESOLUTION` (2048)
            px a side. None: taken in `setup` from the policy's `resolution` attribute where
            it has one (a policy may declare the size it was trained at), else an error asks
            for it.
        on_bad_row: "error" stops at setup listing every bad row (file:line: what is
            wrong); "skip" warns with the count and lines and leaves them out.
        check_pixels: decode every distinct image file at setup (catches truncated JPEGs);
            off checks headers and PNG checksums only, for datasets too big to decode twice.
        batch_size: conditions per batch (a GRPO stage samples a group for each).
        num_workers: DataLoader workers.
        seed: the training order's seed (per epoch; resumes mid-epoch from a checkpoint).
        shuffle: shuffle the training split.

    A stage whose class sets `needs_targets = True` (`SFTModule`) makes a training or
    validation row without a target a bad row.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        image_root: str = ".",
        resolution: int | tuple[int, int] | None = None,
        on_bad_row: Literal["skip", "error"] = "error",
        check_pixels: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.init_args.num_workers must be >= 0, got {num_workers}")
        if on_bad_row not in ("skip", "error"):
            raise ConfigError(
                f"data.init_args.on_bad_row must be 'skip' or 'error', got {on_bad_row!r}"
            )
        if resolution is not None:  # refused before any file is read
            sides = (resolution,) * 2 if isinstance(resolution, int) else resolution
            _checked_side(int(sides[0]), int(sides[-1]))
        self.files = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v}
        if not self.files:
            raise ConfigError(
                "JsonlDataModule needs at least one of train, val, test (jsonl files)"
            )
        for split, file in self.files.items():
            if not Path(file).expanduser().is_file():
                raise FileNotFoundError(
                    f"data.init_args.{split}: jsonl file not found: {Path(file).expanduser().resolve()}"
                )
        self.save_hyperparameters()
        self.splits: dict[str, JsonlEditDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",) if "test" in self.files else ("val",),
        }.get(stage, tuple(self.files))
        if stage == "fit" and "train" not in self.files:
            raise ConfigError("fit needs data.init_args.train (a jsonl file)")
        resolution = self._resolution()
        module = self.trainer.lightning_module if self.trainer is not None else None
        needs_targets = bool(getattr(module, "needs_targets", False))
        for split in wanted:
            if split in self.files and split not in self.splits:
                self.splits[split] = JsonlEditDataset(
                    Path(self.files[split]).expanduser(),
                    resolution,
                    self.hparams.image_root,
                    self.hparams.on_bad_row,
                    require_target=needs_targets and split in ("train", "val"),
                    check_pixels=self.hparams.check_pixels,
                )

    def _resolution(self) -> tuple[int, int]:
        """The configured resolution, else the policy's; checked against its token size."""
        policy = getattr(getattr(self.trainer, "lightning_module", None), "policy", None)
        value = self.hparams.resolution or getattr(policy, "resolution", None)
        if value is None:
            raise ConfigError(
                "set data.init_args.resolution (the image side, or [H, W]): the policy does "
                "not say what size it takes"
            )
        h, w = (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))
        h, w = _checked_side(h, w)
        self.hparams.resolution = h if h == w else [h, w]  # recorded in checkpoints for `edit`
        if policy is not None and hasattr(policy, "token_grid"):
            # a backbone that edits at a preferred size of its own takes any resolution
            size = getattr(policy, "edit_size", lambda s: s)
            rows, cols = policy.token_grid((1024, 1024))  # pixels per token side, probed
            ph, pw = size((1024, 1024))[0] // rows, size((1024, 1024))[1] // cols
            eh, ew = size((h, w))
            if eh % ph or ew % pw:
                raise ConfigError(
                    f"data.init_args.resolution {h}x{w} must be a multiple of the policy's "
                    f"token size {ph}x{pw} px"
                )
        return h, w

    def _loader_kwargs(self) -> dict:
        workers = self.hparams.num_workers
        return dict(
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_rows,
        )

    def _loader(self, split: str) -> DataLoader | list:
        if split not in self.splits:
            return []  # no such split configured: Lightning runs no loop over it
        return DataLoader(self.splits[split], **self._loader_kwargs())

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        order = EpochSampler(len(data), self.hparams.seed, self.hparams.shuffle)
        return ResumableLoader(data, sampler=order, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test" if "test" in self.splits else "val")
