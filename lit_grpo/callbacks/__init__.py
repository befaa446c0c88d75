"""Reusable Lightning callbacks; each depends only on lightning, torch and a documented protocol."""

from lit_grpo.callbacks.checkpoint import ModelCheckpoint
from lit_grpo.callbacks.early_exit import EarlyExitSelector
from lit_grpo.callbacks.ema import EMAWeightAveraging
from lit_grpo.callbacks.progress import PhaseProgressBar

__all__ = ["EMAWeightAveraging", "EarlyExitSelector", "ModelCheckpoint", "PhaseProgressBar"]
