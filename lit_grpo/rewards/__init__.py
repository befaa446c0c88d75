"""Rewards under one contract (`base.py`), the segmenters they use, and the spatial rewards."""

from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput
from lit_grpo.rewards.segmenters import ColourSegmenter, Detections, Segmenter
from lit_grpo.rewards.spatial import (
    BackgroundReward,
    RotationReward,
    ScaleReward,
    TranslationReward,
)

__all__ = [
    "BackgroundReward",
    "ColourSegmenter",
    "Detections",
    "Reward",
    "RewardInputs",
    "RewardOutput",
    "RotationReward",
    "ScaleReward",
    "Segmenter",
    "TranslationReward",
]
