"""Perception: what rewards and metrics both measure with.

`Detections` (what a segmenter found), the `Segmenter` protocol and the ShapeWorld
`ColourSegmenter`, and `geometry` (displacement, rotation, scale and background
measurements of an edit from two `Detections`). Depends on torch, numpy and scipy only
(the colour segmenter reads ShapeWorld's palette lazily, as its default).
"""

from lit_grpo.perception.detections import Detections
from lit_grpo.perception.segmenters import ColourSegmenter, SceneSegmenter, Segmenter

__all__ = ["ColourSegmenter", "Detections", "SceneSegmenter", "Segmenter"]
