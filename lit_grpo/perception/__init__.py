"""Perception: what rewards and metrics both measure with.

`Detections` (what a segmenter found), the `Segmenter` protocol, the ShapeWorld
`ColourSegmenter`, the real-image `SamClipSegmenter` (SAM proposals ranked by open_clip,
both imported lazily, from local weights), the `OrientationEstimator` contract and its
mask-geometry default, `geometry` (displacement, rotation, scale and background
measurements of an edit from two `Detections`; the edit and target regions of an
instruction), and the frozen judges `Frozen` and `clip` (open_clip from local files).
Depends on torch, numpy, scipy and torchvision (the colour segmenter reads ShapeWorld's
palette lazily, as its default; open_clip is imported only when a CLIP model is loaded).
"""

from lit_grpo.perception.detections import Detections
from lit_grpo.perception.orientation import MaskAxisOrientation, OrientationEstimator
from lit_grpo.perception.segmenters import ColourSegmenter, SceneSegmenter, Segmenter
from lit_grpo.perception.text_segmenter import SamClipSegmenter

__all__ = [
    "ColourSegmenter",
    "Detections",
    "MaskAxisOrientation",
    "OrientationEstimator",
    "SamClipSegmenter",
    "SceneSegmenter",
    "Segmenter",
]
