"""InstructRL4Pix: training an editor with PPO on an attention-map reward (papers/003).

InstructRL4Pix (Li, Liu, Chen, Liu 2024) fine-tunes an instruction-based diffusion editor
with PPO over the denoising process seen as a multi-step MDP, rewarding an edit by the
distance between the attention map of the instruction's target object and the region where
that object should be, plus a CLIP term for instruction alignment. Its introduction takes
the multi-step MDP from DDPO (Black et al. 2023), and the summary names no value network, KL
term or clip range: so the PPO here is DDPO's, which is Flow-GRPO's update with one
difference, the baseline:

- every denoising step is an action; the reward comes at the end, and each step's
  advantage is the final reward normalised over the whole batch (`objectives.
  batch_advantages`: DDPO's batch mean and std), not within the group of a condition;
- the clipped importance ratio per step, the step losses averaged into one optimiser step
  per minibatch (`ClippedUpdate`, unchanged); no value network, no KL term by default
  (`kl_beta` still adds Flow-GRPO's). The config takes DDPO's clip range (1e-4) and
  several optimiser steps per rollout batch (`minibatches: 2`): with one, the ratio is
  always 1 when the loss is taken and the clip never binds.

What this module adds to `GRPOModule`, each in one overridden piece:
- `normalise`: DDPO's batch-wide advantages instead of GRPO's per-group ones;
- `observe`: the rewards get the sampler's instruction-to-image attention
  (`capture_attention`), the instruction tokens that name the edited object
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
- per-prompt reward tracking across iterations (DDPO's option) is not implemented: with each
  scene seen once per epoch and G < 16, DDPO falls back to the batch statistics used here;
- group sampling (G rollouts per condition, G >= 2) is kept for a common data layout with
  the other stages; the groups play no part in the advantages.
"""

from torch import Tensor

from lit_grpo.modules.grpo import GRPOModule
from lit_grpo.modules.objectives import Advantages, batch_advantages
from lit_grpo.modules.regions import BatchRegions
from lit_grpo.perception import geometry as geo
from lit_grpo.perception.detections import Detections
from lit_grpo.policies.base import EditPolicy
from lit_grpo.rewards.base import EditSpec, Reward, RewardInputs


class InstructRL4PixModule(GRPOModule):
    """PPO (DDPO's) with InstructRL4Pix's rewards (see module docstring). Takes every
    `GRPOModule` argument but `adv_std` (the advantages are normalised over the whole batch),
    and:

    Args:
        move_fraction: the instructed translation as a fraction of the image side (the
            data's; ShapeWorld's 0.25), to place the target region of a move.
    """

    capture_attention = True

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        move_fraction: float = 0.25,
        **kwargs,
    ):
        if kwargs.get("adv_std", "global") != "global":
            raise ValueError(
                "InstructRL4PixModule normalises advantages over the whole batch (DDPO's "
                f"baseline); adv_std={kwargs['adv_std']!r} does not apply: leave it out"
            )
        super().__init__(policy, rewards, **kwargs)
        self.move_fraction = move_fraction
        self._regions = BatchRegions(self.target_region)

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        """DDPO's advantages of the gathered rewards [B * G]: batch mean and std."""
        return batch_advantages(rewards, group_size, clamp=self.hparams.adv_clamp)

    def target_regions(self, batch: dict) -> tuple[Detections, Tensor]:
        """(the object's detections in the B sources, their target regions [B, H, W] bool),
        segmented once per batch (`BatchRegions`)."""
        return self._regions(self.scorer.segmenter, batch)

    def target_region(self, before: Detections, batch: dict) -> Tensor:
        spec = EditSpec.from_batch(batch)
        size = tuple(batch["source"].shape[-2:])
        return geo.target_region(
            before, spec.task, spec.direction, spec.angle, spec.factor, size, self.move_fraction
        )

    def object_tokens(self, batch: dict) -> Tensor:
        """[B, L] float: 1 on the instruction tokens that name the edited object."""
        instructions, objects = list(batch["instruction"]), list(batch["object"])
        tokens = self.policy.phrase_tokens(instructions, objects)
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

    def observe(
        self, images: Tensor, batch: dict, repeats: int = 1, attention: Tensor | None = None
    ) -> RewardInputs:
        before, region = self.target_regions(batch)
        rows, cols = self.policy.token_grid(tuple(region.shape[-2:]))
        cover = self.policy.pixel_to_tokens(region).view(-1, rows, cols)  # [B, rows, cols]
        tokens = self.object_tokens(batch)  # [B, L]
        return self.scorer.observe(
            images,
            batch,
            repeats,
            attention=attention,
            attention_region=cover.to(images.device).repeat_interleave(repeats, 0),
            before=before,
            attention_tokens=tokens.to(images.device).repeat_interleave(repeats, 0),
        )
