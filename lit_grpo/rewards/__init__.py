"""Rewards under one contract (`base.py`) and the spatial rewards (over `lit_grpo.perception`)."""

from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput
from lit_grpo.rewards.spatial import (
    BackgroundReward,
    RotationReward,
    ScaleReward,
    TranslationReward,
)

__all__ = [
    "BackgroundReward",
    "Reward",
    "RewardInputs",
    "RewardOutput",
    "RotationReward",
    "ScaleReward",
    "TranslationReward",
]
