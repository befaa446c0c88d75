"""Rewards under one contract (`base.py`) and the spatial rewards (over `lit_grpo.perception`)."""

from lit_grpo.rewards.base import EditSpec, Reward, RewardInputs, RewardOutput
from lit_grpo.rewards.regions import RegionReward
from lit_grpo.rewards.scoring import Scorer, Scores
from lit_grpo.rewards.spatial import (
    BackgroundReward,
    RotationReward,
    ScaleReward,
    TranslationReward,
)

__all__ = [
    "BackgroundReward",
    "EditSpec",
    "RegionReward",
    "Reward",
    "RewardInputs",
    "RewardOutput",
    "RotationReward",
    "ScaleReward",
    "Scorer",
    "Scores",
    "TranslationReward",
]
