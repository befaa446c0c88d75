"""Training stages as LightningModules."""

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.sft import SFTModule

__all__ = ["GRPOModule", "SFTModule"]
