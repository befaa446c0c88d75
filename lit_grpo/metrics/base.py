"""The metric contract: the mean of a per-edit value over the edits of one task.

Every edit metric takes the reward contract's inputs, `update(source, edited, batch, before,
after)`: images float [N, 3, H, W] in [0, 1], the batch's condition fields (task, object,
direction, angle, factor, mask_before, mask_after, ...) and the segmenter's `Detections` of
batch["object"] in the source and in the edit. One signature lets a `MetricCollection` feed a
whole table from one call.

State is a sum and a count, both summed across ranks (`dist_reduce_fx="sum"`), so under DDP
`compute()` gives the mean over every rank's edits, the same value one process would get.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_grpo.perception.detections import Detections
from lit_grpo.perception.frozen import Frozen  # noqa: F401  (metrics hold their networks in it)


class EditMetric(Metric):
    """Mean over the edits of `task` (every edit if None) of the per-edit `values`.

    Subclasses implement `values(...) -> [n]` on the rows of their task, NaN where the object
    was missed; a miss then scores `miss` (a failure, never a dropped sample). Classes that
    measure one kind of edit fix `task` as a class attribute.
    """

    is_differentiable = False
    full_state_update = False
    task: str | None = None
    miss: float = 0.0

    total: Tensor
    count: Tensor

    def __init__(self, task: str | None = None) -> None:
        super().__init__()
        fixed = type(self).task
        if fixed is not None and task not in (None, fixed):
            raise ValueError(
                f"{type(self).__name__} scores {fixed!r} edits only, got task={task!r}"
            )
        self.task = fixed or task
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def values(
        self, source: Tensor, edited: Tensor, batch: Mapping, before: Detections, after: Detections
    ) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def update(
        self, source: Tensor, edited: Tensor, batch: Mapping, before: Detections, after: Detections
    ) -> None:
        if self.task is not None:
            if "task" not in batch:
                raise KeyError(
                    f"{type(self).__name__} scores {self.task!r} edits: the batch needs a 'task' field"
                )
            keep = [t == self.task for t in batch["task"]]
            if not any(keep):
                return
            if not all(keep):
                rows = torch.tensor(keep, device=source.device)
                source, edited, batch, before, after = select_rows(
                    rows, source, edited, batch, before, after
                )
        v = self.values(source, edited, batch, before, after).float()
        v = torch.where(v.isnan(), torch.full_like(v, self.miss), v)
        self.total += v.sum()
        self.count += v.numel()

    def compute(self) -> Tensor:
        return self.total / self.count  # NaN before any edit of the task

    def for_task(self, task: str | None) -> EditMetric:
        """A fresh copy scoring only `task`'s edits; frozen networks are shared, not copied."""
        if type(self).task is not None:
            raise ValueError(f"{type(self).__name__} scores {type(self).task!r} edits only")
        twin = self.clone()
        twin.reset()
        twin.task = task
        return twin


def select_rows(
    rows: Tensor,
    source: Tensor,
    edited: Tensor,
    batch: Mapping,
    before: Detections,
    after: Detections,
) -> tuple[Tensor, Tensor, dict, Detections, Detections]:
    """The metric inputs restricted to `rows` (bool [N]); batch fields that are not per-row
    (neither a tensor nor a list of length N) pass through unchanged."""
    n = rows.shape[0]
    idx = rows.nonzero().flatten().tolist()

    def pick(v):
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n:
            return v[rows.to(v.device)]
        if isinstance(v, (list, tuple)) and len(v) == n:
            return [v[i] for i in idx]
        return v

    def pick_detections(d: Detections) -> Detections:
        return Detections(
            **{f.name: getattr(d, f.name)[rows.to(d.found.device)] for f in fields(d)}
        )

    sub = {k: pick(v) for k, v in batch.items()}
    return source[rows], edited[rows], sub, pick_detections(before), pick_detections(after)
