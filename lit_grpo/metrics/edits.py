"""The results table: per task, the spatial metrics plus scene preservation.

The columns carry Talk2Move's metric names (Trans. Dist., Acc., Rot. Err., L1); thresholds
and units are ours (`lit_grpo.metrics.spatial`).

A LightningModule owns one `EditMetrics`, feeds it every validation/test batch and reads the
table at the end of the epoch:

    self.edit_metrics.update(source, edited, batch, before, after)      # *_step
    results = self.edit_metrics.compute()   # on every rank: each metric gathers its state
    self.log_dict({f"val/{t}/{k}": v for t, r in results.items() for k, v in r.items()})
    self.edit_metrics.reset()

or logs the metric objects of `per_task[task]` (a `MetricCollection`) with `self.log_dict`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lit_grpo.metrics.base import select_rows
from lit_grpo.metrics.clip import CLIPScore
from lit_grpo.metrics.lpips import LPIPS
from lit_grpo.metrics.spatial import (
    BackgroundL1,
    EditCount,
    GenEvalTranslationAccuracy,
    ObjectFound,
    RotationAccuracy,
    RotationError,
    ScaleAccuracy,
    TranslationAccuracy,
    TranslationDistance,
)
from lit_grpo.perception.detections import Detections

TASKS = ("translate", "rotate", "scale")
# (result key, column title, format) of the table, in order
COLUMNS = (
    ("n", "n", "{:.0f}"),
    ("found", "found", "{:.3f}"),
    ("distance", "distance", "{:+.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("geneval_accuracy", "GenEval acc.", "{:.3f}"),
    ("rotation_error", "rot. error", "{:.3f}"),
    ("background_l1", "bg L1", "{:.4f}"),
    ("lpips", "LPIPS", "{:.4f}"),
    ("clip", "CLIP", "{:.2f}"),
)


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The results table from `EditMetrics.compute()`: a row per task, '-' where a column does
    not apply; LPIPS and CLIP columns only when some task has them."""
    optional = ("lpips", "clip")
    columns = [
        c for c in COLUMNS if c[0] not in optional or any(c[0] in r for r in results.values())
    ]
    widths = [max(len(title), 8) for _, title, _ in columns]
    lines = [" ".join([f"{'task':<9}"] + [f"{t:>{w}}" for (_, t, _), w in zip(columns, widths)])]
    lines.append("-" * len(lines[0]))
    for task, r in results.items():
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            v = r.get(key)
            cells.append(f"{'-' if v is None or math.isnan(v) else fmt.format(v):>{w}}")
        lines.append(" ".join([f"{task:<9}"] + cells))
    return "\n".join(lines)


class EditMetrics(nn.Module):
    """One `MetricCollection` per task: n, found, background L1 and the task's own metrics
    (translate: distance, accuracy, GenEval's accuracy; rotate: rotation error, accuracy; scale: accuracy), plus
    LPIPS and CLIP score when given.

    Args:
        tasks: the tasks to report.
        min_move: translation accuracy's threshold, in image sides (ours, 0.05).
        max_rotation_error: rotation accuracy's threshold, degrees (ours, 20).
        max_scale_error: scale accuracy's threshold on |log(ratio / factor)| (ours, 0.15).
        rotation_degrees: rotation error in degrees instead of our fraction of 180.
        dilate: px by which the object regions grow before background L1 (and LPIPS).
        lpips: an `LPIPS` metric; each task gets a copy sharing its network.
        clip: a `CLIPScore` metric; likewise.
    """

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        min_move: float = 0.05,
        max_rotation_error: float = 20.0,
        max_scale_error: float = 0.15,
        rotation_degrees: bool = False,
        dilate: int = 1,
        lpips: LPIPS | None = None,
        clip: CLIPScore | None = None,
    ) -> None:
        super().__init__()
        bad = [t for t in tasks if t not in TASKS]
        if not tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
        own: dict[str, dict[str, Metric]] = {
            "translate": {
                "distance": TranslationDistance(),
                "accuracy": TranslationAccuracy(min_move),
                "geneval_accuracy": GenEvalTranslationAccuracy(),
            },
            "rotate": {
                "rotation_error": RotationError(rotation_degrees),
                "accuracy": RotationAccuracy(max_rotation_error),
            },
            "scale": {"accuracy": ScaleAccuracy(max_scale_error)},
        }
        per_task = {}
        for task in tasks:
            metrics = {"n": EditCount(task), "found": ObjectFound(task), **own[task]}
            metrics["background_l1"] = BackgroundL1(task, dilate)
            for key, shared in (("lpips", lpips), ("clip", clip)):
                if shared is not None:
                    metrics[key] = shared.for_task(task)
            # compute_groups=False: metrics whose states happen to agree after the first batch
            # (found and accuracy both 1.0) must not be merged into one
            per_task[task] = MetricCollection(metrics, compute_groups=False)
        self.per_task = nn.ModuleDict(per_task)

    def update(
        self, source: Tensor, edited: Tensor, batch: Mapping, before: Detections, after: Detections
    ) -> None:
        """Route each edit to its task's metrics (by batch["task"]). source, edited: [N, 3, H,
        W] in [0, 1]; before / after: detections of batch["object"] in source and edit."""
        tasks = list(batch["task"])
        for task, metrics in self.per_task.items():
            keep = [t == task for t in tasks]
            if not any(keep):
                continue
            inputs = (source, edited, batch, before, after)
            if not all(keep):
                inputs = select_rows(torch.tensor(keep, device=source.device), *inputs)
            metrics.update(*inputs)

    def compute(self) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} for the tasks with at least one edit on any rank. Under DDP
        every rank must call it, as every metric gathers its state."""
        results = {}
        with warnings.catch_warnings():
            # a rank that saw no edit of a task still takes part in the gather
            warnings.filterwarnings("ignore", message=".*called before the ``update``")
            for task, metrics in self.per_task.items():
                values = {k: float(v) for k, v in metrics.compute().items()}
                if values["n"] > 0:
                    results[task] = values
        return results

    def reset(self) -> None:
        for metrics in self.per_task.values():
            metrics.reset()

    format_table = staticmethod(format_table)
