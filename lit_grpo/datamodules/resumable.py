"""A training order that resumes mid-epoch, for a run killed and resumed from a checkpoint.

Lightning stores the `state_dict()` of a training loader that has one (a "stateful" loader)
in the checkpoint's loop state, and gives it back to `load_state_dict` before the resumed
epoch's first batch. A plain DataLoader it cannot fast-forward: the resumed epoch starts
over (with a warning), so the batches before the checkpoint are trained twice and the last
ones of the epoch never. Here:

- `EpochSampler` draws the order of an epoch from (seed, epoch) alone, not from the global
  RNG (which no checkpoint holds), and can start a pass after its first `skip` samples;
- `ResumableLoader` numbers its passes (epochs) itself and counts the batches it delivered
  in the current one; restored, its next pass continues that epoch after them, without
  rendering the skipped samples, and the passes after it follow as in a run never stopped.
  A pass that ends before its epoch does (`limit_train_batches`, or Lightning closing the
  epoch of a checkpoint written at its very end after one more batch) is continued by the
  next pass, so every sample of an epoch is seen once before the next epoch starts.

The loader counts epochs rather than taking Lightning's `set_epoch`: a fit stopped by
`max_steps` mid-epoch counts that epoch as processed, so the resumed run would be told the
next epoch's number while it finishes this one. Lightning does not prefetch from a loader
with a length, so "delivered" is exactly "started by the training loop" when a checkpoint
is written (at the end of a batch, of a validation, of the fit).

Several data-parallel ranks (DDP, FSDP): `EpochSampler` deals the epoch's order out itself,
rank r taking positions r, r + W, r + 2W, ... (W ranks; the order padded with its first
samples to a multiple of W, as torch's `DistributedSampler` pads). It is a
`DistributedSampler`, so Lightning keeps it instead of wrapping it in one of its own, and
every rank skips its own delivered batches on resume. Batch s of every rank together holds
exactly positions [s * W * B, (s + 1) * W * B) of the epoch's order: the conditions one
process with batch W * B would train on at that step.
"""

import math

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class EpochSampler(DistributedSampler):
    """The indices of `size` samples, shuffled per epoch by (seed, epoch) or in order; with
    `num_replicas` > 1, the share of data-parallel rank `rank` (see the module docstring).

    A `DistributedSampler` by type only (Lightning then leaves it in place); its own
    constructor is not run: nothing here needs the process group.
    """

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0  # samples to leave out at the start of the next pass only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, in order."""
        if not self.shuffle:
            order = np.arange(self.size)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        padded = np.resize(order, len(self) * self.num_replicas)  # repeats from the start
        return padded[self.rank :: self.num_replicas]

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.order(self.epoch)[skip:].tolist())

    def __len__(self) -> int:
        # this rank's share of the epoch, whatever a resumed pass leaves out
        return math.ceil(self.size / self.num_replicas)


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` that resumes where a checkpoint left its epoch."""

    def __init__(self, dataset: Dataset, *, sampler: Sampler, **kwargs):
        # sampler by keyword only: Lightning rebuilds the loader with its own sampler under
        # DDP (`sampler=DistributedSampler(...)`), passing the positional arguments again
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch, self._delivered = -1, -1  # no pass started yet
        self._resume: tuple[int, int] | None = None

    def __iter__(self):
        # a generator: this runs at the first batch of a pass, not when Lightning calls iter()
        if self._resume is not None:
            (epoch, skip), self._resume = self._resume, None
        elif 0 <= self._delivered < len(self):  # a pass cut short: the next one continues it
            epoch, skip = self._epoch, self._delivered
        else:
            epoch, skip = self._epoch + 1, 0
        if skip >= len(self):  # the epoch was complete
            epoch, skip = epoch + 1, 0
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.skip = skip * self.batch_size
        self._epoch, self._delivered = epoch, skip
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": max(self._epoch, 0), "batches": max(self._delivered, 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))
