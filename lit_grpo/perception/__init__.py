"""Perception: what rewards and metrics both measure with.

`Detections` (what a segmenter found), the `Segmenter` protocol and the ShapeWorld
`ColourSegmenter`, `geometry` (displacement, rotation, scale and background
measurements of an edit from two `Detections`; the edit and target regions of an
instruction), and the frozen judges `Frozen` and `clip` (open_clip from local files).
Depends on torch, numpy, scipy and torchvision (the colour segmenter reads ShapeWorld's
palette lazily, as its default; open_clip is imported only when a CLIP model is loaded).
"""

from lit_grpo.perception.detections import Detections
from lit_grpo.perception.segmenters import ColourSegmenter, SceneSegmenter, Segmenter

__all__ = ["ColourSegmenter", "Detections", "SceneSegmenter", "Segmenter"]
