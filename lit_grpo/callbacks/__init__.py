"""Reusable Lightning callbacks; each depends only on lightning, torch and a documented protocol."""

from lit_grpo.callbacks.progress import PhaseProgressBar

__all__ = ["PhaseProgressBar"]
