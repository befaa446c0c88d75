"""Training stages as LightningModules."""

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.instructrl4pix import InstructRL4PixModule
from lit_grpo.modules.rcgrpo import NeighborRCGRPOModule, RCGRPOModule
from lit_grpo.modules.sft import SFTModule
from lit_grpo.modules.spatialflow import SpatialFlowGRPOModule

__all__ = [
    "GRPOModule",
    "InstructRL4PixModule",
    "NeighborRCGRPOModule",
    "RCGRPOModule",
    "SFTModule",
    "SpatialFlowGRPOModule",
]
