"""Rewards under one contract (`base.py`), the spatial rewards (over `lit_grpo.perception`),
RC-GRPO's attention concentration reward (`attention.py`), SpatialFlow-GRPO's region reward
(`regions.py`), and InstructRL4Pix's attention-map and CLIP rewards (`attention_distance.py`,
`clip_reward.py`; open_clip is imported only when a `CLIPReward` is built), and
`RemoteReward` (`remote.py`), the rewards of a `serve-rewards` server (`server.py`, over the
wire format of `wire.py`), and `VLMJudgeReward` (`vlm_judge.py`), a vision-language model
behind an OpenAI-compatible chat endpoint judging each edit (its answers read by
`judge_answers.py`)."""

from lit_grpo.rewards.attention import AttentionConcentrationReward
from lit_grpo.rewards.attention_distance import AttentionMapReward
from lit_grpo.rewards.base import EditSpec, Reward, RewardInputs, RewardOutput
from lit_grpo.rewards.clip_reward import CLIPReward
from lit_grpo.rewards.regions import RegionReward
from lit_grpo.rewards.remote import RemoteReward
from lit_grpo.rewards.scoring import Scorer, Scores
from lit_grpo.rewards.spatial import (
    BackgroundReward,
    RotationReward,
    ScaleReward,
    TranslationReward,
)
from lit_grpo.rewards.vlm_judge import VLMJudgeReward

__all__ = [
    "AttentionConcentrationReward",
    "AttentionMapReward",
    "BackgroundReward",
    "CLIPReward",
    "EditSpec",
    "RegionReward",
    "RemoteReward",
    "Reward",
    "RewardInputs",
    "RewardOutput",
    "RotationReward",
    "ScaleReward",
    "Scorer",
    "Scores",
    "TranslationReward",
    "VLMJudgeReward",
]
