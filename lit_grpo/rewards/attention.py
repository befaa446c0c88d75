"""RC-GRPO-Editing's attention concentration reward.

The share of the instruction tokens' attention mass over the edit's image tokens that falls
inside the edit region: with A [L, T] the sampler's instruction-to-image map of a rollout
(averaged over layers, heads and the sampled steps; padding tokens are 0) and c [T] the
share of each image token inside the region,

    r = sum_l sum_t c_t A_lt / sum_l sum_t A_lt

which is the share of the map averaged over the instruction's tokens (the token count
cancels). It is in [0, 1]; a rollout with no attention mass on image tokens cannot be scored
(NaN).

Departures from the paper: it reads the attention of every instruction token alike (the
paper's "instruction tokens" may mean the tokens naming the object; our word-level
tokenizer has no such split) and of every layer and sampled step (the paper says "chosen
layers and steps"); the map is the instruction tokens' attention to the noisy target
tokens in FLUX's joint attention (softmax over all keys), not a UNet's cross-attention. The
region is `perception.geometry.edit_region`, from the source detection and the instruction.
"""

import torch

from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput


class AttentionConcentrationReward(Reward):
    """Share of the instruction's attention mass inside the edit region, in [0, 1]."""

    name = "attention_concentration"

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        attention, region = inputs.attention, inputs.attention_region
        if attention is None or region is None:
            raise ValueError(
                "AttentionConcentrationReward needs the sampler's attention maps and the edit "
                "region at token resolution (RewardInputs.attention, .attention_region); train "
                "with lit_grpo.modules.RCGRPOModule (or NeighborRCGRPOModule), which records them"
            )
        n = inputs.images.shape[0]
        if attention.ndim != 4 or attention.shape[0] != n:
            raise ValueError(f"attention must be [N={n}, L, rows, cols], got {attention.shape}")
        if region.shape != (n, *attention.shape[-2:]):
            raise ValueError(
                f"attention_region must be [N, rows, cols] = {(n, *attention.shape[-2:])}, "
                f"got {tuple(region.shape)}"
            )
        mass = attention.float().sum(1)  # [N, rows, cols]: summed over the instruction tokens
        total = mass.flatten(1).sum(1)
        inside = (mass * region.float()).flatten(1).sum(1)
        share = inside / total
        share = torch.where(total > 0, share, torch.full_like(share, float("nan")))
        return RewardOutput(share)
