"""Scoring a batch of edits: segment once, run every reward, sum them with their weights.

`Scorer.observe` builds the `RewardInputs` (the object segmented once per source and once
per edit; the batch reduced to what a reward may see); `Scorer.judge` runs the rewards,
checks each returns the contract's shapes, and adds them up. The GRPO stages and the
benchmarks score through this one piece.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_grpo.perception.detections import Detections
from lit_grpo.perception.segmenters import ColourSegmenter, SceneSegmenter, Segmenter
from lit_grpo.rewards.base import (
    EditSpec,
    Reward,
    RewardFailed,
    RewardInputs,
    RewardOutput,
    run_reward,
)


@dataclass
class Scores:
    """total: [N] weighted sum (NaN where a reward could not score); parts: every reward's
    and sub-score's [N] values by name (for logging); regions: the `RewardOutput` of the
    rewards that score regions ([N, R] scores, names, [N, R, H, W] masks), by reward name."""

    total: Tensor
    parts: dict[str, Tensor]
    regions: dict[str, RewardOutput]

    @classmethod
    def cat(cls, chunks: list["Scores"]) -> "Scores":
        """The scores of consecutive chunks of rollouts, as one (rows in order). A part or
        region reward a chunk lacks (a `RemoteReward` batch without scores returns only
        `remote_failures`) is NaN on its rows, its masks uniform, as a failed batch's are."""
        if len(chunks) == 1:
            return chunks[0]
        sizes = [c.total.shape[0] for c in chunks]
        parts = _cat_named([c.parts for c in chunks], sizes)
        regions = {}
        for key in dict.fromkeys(k for c in chunks for k in c.regions):
            like = next(c.regions[key] for c in chunks if key in c.regions)
            outs = [c.regions.get(key) or _no_regions(like, n) for c, n in zip(chunks, sizes)]
            regions[key] = RewardOutput(
                torch.cat([o.scores for o in outs]),
                _cat_named([o.extras for o in outs], sizes),
                regions=torch.cat([o.regions for o in outs]),
                region_names=like.region_names,
                region_masks=torch.cat([o.region_masks for o in outs]),
            )
        return cls(torch.cat([c.total for c in chunks]), parts, regions)


class Scorer(nn.Module):
    """The rewards and the segmenter they share (frozen judges)."""

    def __init__(self, rewards: list[Reward], segmenter: Segmenter | None = None):
        super().__init__()
        if not rewards:
            raise ValueError("scoring needs at least one reward")
        self.rewards = nn.ModuleList(rewards)
        self.segmenter = segmenter or ColourSegmenter()
        self.keys = log_keys(rewards)

    @torch.no_grad()
    def observe(
        self,
        images: Tensor,
        batch: dict,
        repeats: int = 1,
        attention: Tensor | None = None,
        attention_region: Tensor | None = None,
        before: Detections | None = None,
        attention_tokens: Tensor | None = None,
    ) -> RewardInputs:
        """What the rewards see of `images` [B * repeats, 3, H, W], the edits of the batch's
        B conditions (each `repeats` times in a row). `attention` [B * repeats, L, rows,
        cols], `attention_region` [B * repeats, rows, cols] and `attention_tokens`
        [B * repeats, L] are passed through for attention rewards; `before` (the B sources'
        detections) saves segmenting the sources again when the caller already has them."""
        spec = EditSpec.from_batch(batch).repeat_interleave(repeats)
        if before is None:
            before = self.segmenter(batch["source"], batch["object"])
        ids = batch.get("index")
        scene = None
        if any(r.needs_scene for r in self.rewards):
            if not isinstance(self.segmenter, SceneSegmenter):
                raise TypeError(
                    f"a reward needs every object of the scene, and the segmenter "
                    f"{type(self.segmenter).__name__} has no objects(images); use one that does "
                    "(lit_grpo.perception.ColourSegmenter on ShapeWorld)"
                )
            scene = self.segmenter.objects(batch["source"]).repeat_interleave(repeats, 0)
        return RewardInputs(
            images=images,
            source=batch["source"].repeat_interleave(repeats, 0),
            instructions=[t for t in batch["instruction"] for _ in range(repeats)],
            spec=spec,
            before=before.repeat_interleave(repeats),
            after=self.segmenter(images, spec.object),
            ids=None if ids is None else torch.as_tensor(ids).repeat_interleave(repeats),
            source_objects=scene,
            attention=attention,
            attention_region=attention_region,
            attention_tokens=attention_tokens,
        )

    @torch.no_grad()
    def judge(self, inputs: RewardInputs) -> Scores:
        n = inputs.images.shape[0]
        total = torch.zeros(n, device=inputs.images.device)
        parts = {"object_found": inputs.after.found.float()}
        regions = {}
        for reward, key in zip(self.rewards, self.keys):
            out = run_reward(reward, inputs)  # one RewardFailed line naming a broken reward
            total = total + reward.weight * out.scores.float()
            parts[key] = out.scores.float()
            prefix = "" if key == reward.name else f"{key}/"
            parts.update({prefix + k: v for k, v in out.extras.items()})
            if out.regions is not None:
                r = out.regions.shape[1] if out.regions.ndim == 2 else -1
                masks = out.region_masks
                if (
                    out.regions.shape[0] != n
                    or len(out.region_names) != r
                    or masks is None
                    or tuple(masks.shape[:2]) != (n, r)
                ):
                    raise RewardFailed(
                        f"reward {type(reward).__name__} {reward.name!r} returned regions {tuple(out.regions.shape)} "
                        f"named {out.region_names}; the contract is [N, R] scores with R names "
                        "and [N, R, H, W] region_masks"
                    )
                regions[key] = out
        return Scores(total, parts, regions)

    def forward(self, images: Tensor, batch: dict, repeats: int = 1) -> Scores:
        return self.judge(self.observe(images, batch, repeats))


def _cat_named(chunks: list[dict[str, Tensor]], sizes: list[int]) -> dict[str, Tensor]:
    """Named [n_i] values of consecutive chunks joined; NaN where a chunk lacks a name."""
    out = {}
    for key in dict.fromkeys(k for c in chunks for k in c):
        like = next(c[key] for c in chunks if key in c)
        out[key] = torch.cat(
            [
                c[key] if key in c else like.new_full((n,), float("nan"))
                for c, n in zip(chunks, sizes)
            ]
        )
    return out


def _no_regions(like: RewardOutput, n: int) -> RewardOutput:
    """n rows of a region reward that did not score them: NaN, uniform masks."""
    r, masks = like.regions.shape[1], like.region_masks
    return RewardOutput(
        like.scores.new_full((n,), float("nan")),
        regions=like.regions.new_full((n, r), float("nan")),
        region_masks=masks.new_full((n, *masks.shape[1:]), 1 / max(r, 1)),
    )


def log_keys(rewards: list) -> list[str]:
    """Each reward's key in the logs and in `Scores.parts` / `.regions`: its `name`, with
    `_2`, `_3`, ... on the second and later rewards of one name (two TranslationRewards with
    different settings would otherwise overwrite each other's logged values)."""
    seen: dict[str, int] = {}
    keys = []
    for reward in rewards:
        seen[reward.name] = seen.get(reward.name, 0) + 1
        n = seen[reward.name]
        keys.append(reward.name if n == 1 else f"{reward.name}_{n}")
    return keys
