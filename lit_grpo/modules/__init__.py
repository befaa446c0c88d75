"""Training stages as LightningModules."""

from lit_grpo.modules.sft import SFTModule

__all__ = ["SFTModule"]
