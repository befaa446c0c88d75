"""Policy objectives, one file per paper, pure torch (no Lightning).

Each file holds its paper's maths and one `Objective` (`base.py`: the contract the update
loop calls): `FlowGRPO` (flow_grpo.py), `RegionAveragedGRPO` (rcgrpo.py: RC-GRPO's region
on Flow-GRPO's SDE, ours), `NeighborGRPO` (neighbor.py: RC-GRPO's paper path),
`SpatialFlowGRPO` (spatialflow.py), `DDPO` (ddpo.py: InstructRL4Pix's PPO), `DiffusionNFT`
(nft.py: flow matching on the forward process, no log-probability), `RegionNFT`
(region_nft.py: DiffusionNFT on SpatialFlow-GRPO's region credit with a scene hold, ours).
Chosen in YAML as
`model.init_args.objective` by `class_path`.
"""

from lit_grpo.objectives.base import (
    Advantages,
    LossInputs,
    LossStats,
    Objective,
    PolicyTargets,
    Ranks,
)
from lit_grpo.objectives.ddpo import DDPO
from lit_grpo.objectives.flow_grpo import FlowGRPO
from lit_grpo.objectives.neighbor import NeighborGRPO
from lit_grpo.objectives.nft import DiffusionNFT
from lit_grpo.objectives.rcgrpo import RegionAveragedGRPO
from lit_grpo.objectives.region_nft import RegionNFT
from lit_grpo.objectives.spatialflow import SpatialFlowGRPO

__all__ = [
    "DDPO",
    "Advantages",
    "DiffusionNFT",
    "FlowGRPO",
    "LossInputs",
    "LossStats",
    "NeighborGRPO",
    "Objective",
    "PolicyTargets",
    "Ranks",
    "RegionAveragedGRPO",
    "RegionNFT",
    "SpatialFlowGRPO",
]
