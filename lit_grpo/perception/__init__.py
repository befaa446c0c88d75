"""Perception: what rewards and metrics both measure with.

`Detections` (what a segmenter found), the `Segmenter` protocol, the ShapeWorld
`ColourSegmenter`, the real-image `SamClipSegmenter` (SAM proposals ranked by open_clip,
both imported lazily, from local weights), the `OrientationEstimator` contract and its
mask-geometry default, and `geometry` (displacement, rotation, scale and background
measurements of an edit from two `Detections`). Depends on torch, numpy and scipy (the
colour segmenter reads ShapeWorld's palette lazily, as its default).
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
