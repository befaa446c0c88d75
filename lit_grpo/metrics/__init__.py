"""Edit metrics as torchmetrics `Metric`s, DDP-correct: Talk2Move's metric names, our
thresholds and units (`lit_grpo.metrics.spatial`).

The spatial metrics compute through `lit_grpo.perception.geometry`, the measurements the spatial rewards
use. `EditMetrics` routes each edit to its task's metrics and prints the table. open_clip is
imported only when a `CLIPScore` is built.
"""

from lit_grpo.metrics.base import EditMetric
from lit_grpo.metrics.clip import CLIPScore
from lit_grpo.metrics.edits import EditMetrics, format_table
from lit_grpo.metrics.lpips import LPIPS, alexnet_weights
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

__all__ = [
    "BackgroundL1",
    "CLIPScore",
    "EditCount",
    "EditMetric",
    "EditMetrics",
    "GenEvalTranslationAccuracy",
    "LPIPS",
    "ObjectFound",
    "RotationAccuracy",
    "RotationError",
    "ScaleAccuracy",
    "TranslationAccuracy",
    "TranslationDistance",
    "alexnet_weights",
    "format_table",
]
