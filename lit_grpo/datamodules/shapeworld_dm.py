"""ShapeWorld as a LightningDataModule: seeded train / val / test splits of paired edits.

Samples are rendered on the fly (about a millisecond each), so `train_size` only sets the
epoch length; splits come from disjoint random streams (see `shapeworld.py`). The training
order is a function of (seed, epoch) and resumes mid-epoch from a checkpoint (`resumable.py`).
"""

import lightning as L
from torch.utils.data import DataLoader

from lit_grpo.datamodules.resumable import EpochSampler, ResumableLoader
from lit_grpo.datamodules.shapeworld import ShapeWorld


class ShapeWorldDataModule(L.LightningDataModule):
    """Paired ShapeWorld edits: source, instruction, exact target, masks and boxes.

    Args:
        resolution: image side in pixels, 16..2048 (`shapeworld.MAX_RESOLUTION`).
        batch_size: conditions per batch (a GRPO stage samples a group for each).
        tasks: any of translate, rotate, scale.
        train_size, val_size, test_size: samples per split (train: one epoch).
        move_fraction: translation distance as a fraction of the image side.
        seed: base seed of every split.
        num_workers: DataLoader workers (0 renders in the training process).
        shuffle: shuffle the training split, in an order drawn from (seed, epoch) (off: a
            fixed order, e.g. for comparisons).
        objects: (min, max) shapes per scene, within 1-3; (2, 3) for multi-object scenes.
    """

    def __init__(
        self,
        resolution: int = 32,
        batch_size: int = 32,
        tasks: list[str] = ("translate", "rotate", "scale"),
        train_size: int = 50_000,
        val_size: int = 256,
        test_size: int = 512,
        move_fraction: float = 0.25,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        objects: tuple[int, int] = (1, 3),
    ):
        super().__init__()
        if batch_size < 1:  # the DataLoader would refuse it only once training starts
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        common = dict(
            resolution=resolution,
            tasks=tuple(tasks),
            seed=seed,
            move_fraction=move_fraction,
            objects=tuple(objects),
        )
        # Built here, not in setup(), so a bad resolution or task fails before training.
        self.splits = {
            "train": ShapeWorld("train", train_size, **common),
            "val": ShapeWorld("val", val_size, **common),
            "test": ShapeWorld("test", test_size, **common),
        }

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        workers = self.hparams.num_workers
        return dict(
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        # several data-parallel ranks: each takes its share of the epoch (see resumable.py)
        ranks = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        order = EpochSampler(len(data), self.hparams.seed, self.hparams.shuffle, **(ranks or {}))
        return ResumableLoader(data, sampler=order, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
