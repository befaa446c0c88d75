"""RC-GRPO-Editing's region constraint on Flow-GRPO's SDE objective: our extension.

The paper samples with the ODE and trains Neighbor GRPO's objective
(`lit_grpo.objectives.neighbor`). Beside it we keep Flow-GRPO's SDE with its step noise
decoupled by the edit region (`RegionDecoupledNoise(mask_sde=True)`): outside the region a
group's transitions are (nearly) shared, so they carry no credit, only noise. The clipped
ratio is therefore taken on each step's log-probability averaged over the edit region's
elements, weighted by the region's coverage in [0, 1] (cells on its edge count in part),
instead of over the whole latent. Everything else is Flow-GRPO's.
"""

from torch import Tensor

from lit_grpo.objectives.base import LossInputs
from lit_grpo.objectives.flow_grpo import FlowGRPO


def region_average(elements: Tensor, regions: Tensor) -> Tensor:
    """Per-element log-probs [n, C, h, w] -> per sample [n]: the mean over the elements of
    each row's region, weighted by its coverage (`regions` [n, h, w] in [0, 1])."""
    weight = regions.float()[:, None].expand_as(elements)  # [n, C, h, w]
    total = weight.flatten(1).sum(1).clamp_min(1e-8)
    return (elements.float() * weight).flatten(1).sum(1) / total  # [n]


class RegionAveragedGRPO(FlowGRPO):
    """Flow-GRPO with the log-probabilities averaged over the edit region (see module
    docstring). Takes `FlowGRPO`'s arguments; the rollouts must carry their regions (the
    module's `regions` component hands them to the noise builder)."""

    def reduce(self, elements: Tensor, inputs: LossInputs) -> Tensor:
        if inputs.record.regions is None:
            raise ValueError(
                "the rollouts carry no edit regions: sample with the RCGRPOModule preset "
                "(or GRPOModule with regions: lit_grpo.modules.rcgrpo.EditRegions)"
            )
        return region_average(elements, inputs.record.regions[inputs.rows])
