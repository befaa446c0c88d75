"""Reusable Lightning callbacks; each depends only on lightning, torch and a documented protocol."""

from lit_grpo.callbacks.checkpoint import ModelCheckpoint
from lit_grpo.callbacks.early_exit import EarlyExitSelector
from lit_grpo.callbacks.ema import EMAWeightAveraging
from lit_grpo.callbacks.lora_export import LoraExporter
from lit_grpo.callbacks.progress import PhaseProgressBar, RichProgressBar
from lit_grpo.callbacks.rollout_images import RolloutImageLogger
from lit_grpo.callbacks.stop import StopOnSignal
from lit_grpo.callbacks.summary import ModelSummary
from lit_grpo.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EMAWeightAveraging",
    "EarlyExitSelector",
    "LoraExporter",
    "ModelCheckpoint",
    "ModelSummary",
    "PhaseProgressBar",
    "RichProgressBar",
    "RolloutImageLogger",
    "StopOnSignal",
    "ThroughputMonitor",
]
