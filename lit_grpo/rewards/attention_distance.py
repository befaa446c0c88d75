"""InstructRL4Pix's attention-map reward: the target object's attention against its target
region (papers/003).

InstructRL4Pix rewards an edit by the distance between the attention map of the target
object (the instruction's words naming it) and the region where that object should be. With
A [L, T] a rollout's instruction-to-image attention over the T image tokens (layers, heads
and the sampled steps averaged; `RewardInputs.attention`), w [L] the object's tokens
(`RewardInputs.attention_tokens`) and c [T] the share of each token inside the target
region (`RewardInputs.attention_region`), both maps are made distributions over the tokens,

    p_t = sum_l w_l A_lt / sum_t' sum_l w_l A_lt'        q_t = c_t / sum_t' c_t'

and their distance is the total variation d = 1/2 sum_t |p_t - q_t| in [0, 1]. The reward
is 1 - d = sum_t min(p_t, q_t), the overlap of the two maps: 1 when the object's attention
is spread over its target region exactly, 0 when none of it falls there. (Maximising
1 - d is maximising -d: a constant does not move normalised advantages.) A rollout whose
object tokens put no mass on the image, or whose target region is empty (the object was not
found in the source), cannot be scored (NaN).

Against RC-GRPO's attention concentration (`attention.py`, the mass inside a region), this
also pays for covering the region: mass piled on one token of it scores low.

Where we choose, the paper summary being silent: total variation as the distance (bounded,
independent of the token count, so its weight against the CLIP reward means the same at
any resolution); the attention of the object's words only, summed over them; every layer
and sampled step averaged. The target region is ours too
(`perception.geometry.target_region`: the source mask moved by the instruction), and the
map is the object tokens' attention to the noisy target tokens in FLUX-style joint
attention (softmax over all keys), not a UNet's cross-attention.
"""

import torch
from torch import Tensor

from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput


def attention_map_distance(attention: Tensor, tokens: Tensor, region: Tensor) -> Tensor:
    """Total variation between the object's attention map and the target region [N].

    attention: [N, L, rows, cols] (>= 0); tokens: [N, L] weights of the object's tokens;
    region: [N, rows, cols] coverage in [0, 1]. NaN where either map has no mass.
    """
    n = attention.shape[0]
    if attention.ndim != 4 or tokens.shape != attention.shape[:2]:
        raise ValueError(
            f"attention must be [N, L, rows, cols] and tokens [N, L]; got "
            f"{tuple(attention.shape)} and {tuple(tokens.shape)}"
        )
    if region.shape != (n, *attention.shape[-2:]):
        raise ValueError(
            f"region must be [N, rows, cols] = {(n, *attention.shape[-2:])}, "
            f"got {tuple(region.shape)}"
        )
    a = (attention.float() * tokens.float()[:, :, None, None]).sum(1).flatten(1)  # [N, T]
    c = region.float().flatten(1)  # [N, T]
    a_mass, c_mass = a.sum(1, keepdim=True), c.sum(1, keepdim=True)
    p = a / a_mass.clamp_min(1e-12)
    q = c / c_mass.clamp_min(1e-12)
    d = 0.5 * (p - q).abs().sum(1)
    scorable = (a_mass[:, 0] > 0) & (c_mass[:, 0] > 0)
    return torch.where(scorable, d, torch.full_like(d, float("nan")))


class AttentionMapReward(Reward):
    """1 - total variation between the object's attention and its target region, in [0, 1]
    (see module docstring)."""

    name = "attention_map"

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        attention, tokens = inputs.attention, inputs.attention_tokens
        region = inputs.attention_region
        if attention is None or tokens is None or region is None:
            raise ValueError(
                "AttentionMapReward needs the sampler's attention maps, the object's tokens "
                "and the target region at token resolution (RewardInputs.attention, "
                ".attention_tokens, .attention_region); train with "
                "lit_grpo.modules.InstructRL4PixModule, which records them"
            )
        if attention.shape[0] != inputs.images.shape[0]:
            raise ValueError(
                f"attention has {attention.shape[0]} rows for {inputs.images.shape[0]} edits"
            )
        return RewardOutput(1.0 - attention_map_distance(attention, tokens, region))
