"""Rewards under one contract (`base.py`), the spatial rewards (over `lit_grpo.perception`) and
RC-GRPO's attention concentration reward (`attention.py`)."""

from lit_grpo.rewards.attention import AttentionConcentrationReward
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
    "AttentionConcentrationReward",
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
