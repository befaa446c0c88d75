"""InstructRL4Pix: training an editor with PPO on an attention-map reward (papers/003).

InstructRL4Pix (Li, Liu, Chen, Liu 2024) fine-tunes an instruction-based diffusion editor
with PPO over the denoising process seen as a multi-step MDP, rewarding an edit by the
distance between the attention map of the instruction's target object and the region where
that object should be, plus a CLIP term for instruction alignment. Its introduction takes
the multi-step MDP from DDPO (Black et al. 2023), and the summary names no value network, KL
term or clip range: so the PPO here is DDPO's, which is Flow-GRPO's update with one
difference, the baseline:

- every denoising step is an action; the reward comes at the end, and each step's
  advantage is the final reward normalised over the whole batch (`objectives.ddpo.
  batch_advantages`: DDPO's batch mean and std), not within the group of a condition;
- the clipped importance ratio per step, the step losses averaged into one optimiser step
  per minibatch (Flow-GRPO's loss, unchanged); no value network, no KL term by default
  (`kl_beta` still adds Flow-GRPO's). The config takes DDPO's clip range (1e-4) and
  several optimiser steps per rollout batch (`minibatches: 2`): with one, the ratio is
  always 1 when the loss is taken and the clip never binds.

What this module adds, as components of `GRPOModule`:
- `objective`: `lit_grpo.objectives.DDPO`, DDPO's batch-wide advantages instead of GRPO's
  per-group ones;
- `regions`: `TargetRegions`, so the rewards get the sampler's instruction-to-image
  attention, the instruction tokens that name the edited object
  (`EditPolicy.phrase_tokens`) and the target region at token resolution, for
  `lit_grpo.rewards.AttentionMapReward`; `lit_grpo.rewards.CLIPReward` is the CLIP term.

Where we depart from the paper, and why:
- the editor is a flow-matching transformer sampled with Flow-GRPO's SDE (the policy's
  Gaussian steps), not the paper's diffusion UNet sampled with DDIM; its attention is the
  object tokens' share of joint attention over the noisy target tokens, not UNet
  cross-attention;
- the target region comes from what a reward may see, the object segmented in the source
  moved by the parsed instruction (`perception.geometry.target_region`; exact up to
  pixel rounding on ShapeWorld), where the paper takes it from its data;
- group sampling (G rollouts per condition, G >= 2) is kept for a common data layout with
  the other stages; the groups play no part in the advantages.
"""

from torch import Tensor

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.regions import Regions
from lit_grpo.objectives.ddpo import DDPO
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.detections import Detections
from lit_grpo.policies.base import EditPolicy
from lit_grpo.rewards.base import EditSpec, Reward


class TargetRegions(Regions):
    """InstructRL4Pix's target region (where the object should end up) and the object's
    instruction tokens, for the attention-map reward (see module docstring).

    Args:
        move_fraction: the instructed translation as a fraction of the image side (the
            data's; ShapeWorld's 0.25), to place the target region of a move.
    """

    def __init__(self, move_fraction: float = 0.25):
        super().__init__()
        self.move_fraction = move_fraction

    def region(self, before: Detections, batch: dict) -> Tensor:
        spec = EditSpec.from_batch(batch)
        size = tuple(batch["source"].shape[-2:])
        return geo.target_region(
            before, spec.task, spec.direction, spec.angle, spec.factor, size, self.move_fraction
        )

    def reward_extras(self, policy, batch: dict, repeats: int) -> dict:
        tokens = object_tokens(policy, batch)  # [B, L]
        return {"attention_tokens": tokens.repeat_interleave(repeats, 0)}


def object_tokens(policy, batch: dict) -> Tensor:
    """[B, L] float: 1 on the instruction tokens that name the edited object."""
    instructions, objects = list(batch["instruction"]), list(batch["object"])
    tokens = policy.phrase_tokens(instructions, objects)
    missing = [i for i in range(len(objects)) if not bool(tokens[i].any())]
    if missing:
        i = missing[0]
        raise ValueError(
            f"the object phrase {objects[i]!r} does not occur in its instruction "
            f"{instructions[i]!r} (within the policy's token limit); the attention-map "
            "reward reads the attention of the tokens that name the object, so every "
            "instruction must spell batch['object']"
        )
    return tokens.float()


class InstructRL4PixModule(GRPOModule):
    """PPO (DDPO's) with InstructRL4Pix's rewards (see module docstring): `GRPOModule` with
    `objective=DDPO(clip_range, kl_beta, adv_clamp)` and `regions=TargetRegions(move_fraction)`.
    Takes every other `GRPOModule` argument; `adv_std` does not apply (the advantages are
    normalised over the whole batch)."""

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        move_fraction: float = 0.25,
        clip_range: float = 2e-4,
        kl_beta: float = 0.0,
        adv_clamp: float = 5.0,
        adv_std: str = "global",
        **kwargs,
    ):
        if adv_std != "global":
            raise ValueError(
                "InstructRL4PixModule normalises advantages over the whole batch (DDPO's "
                f"baseline); adv_std={adv_std!r} does not apply: leave it out"
            )
        objective = DDPO(clip_range, kl_beta, adv_clamp)
        regions = TargetRegions(move_fraction)
        super().__init__(policy, rewards, objective=objective, regions=regions, **kwargs)
