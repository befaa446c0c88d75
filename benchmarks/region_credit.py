"""Where SpatialFlow-GRPO's loss puts the edit's credit (issues 11 and 23, the main job).

    python benchmarks/region_credit.py --n 64 --group 8

The shipped SFT editor rolls out G edits of each held-out 2-3 object ShapeWorld translation
(test split) exactly as `configs/spatialflow.yaml` trains (early exit at K = 4 of 10 steps,
noise level 1). The same rollouts are scored by `RegionReward` twice: with the instructed
target place in the edit region (`target=True`, the default) and without it (the object's
old and drawn places only); each gives the region advantages and token cover that the update
trains on (`SpatialFlowGRPOModule.advantages`), under the loss's `--region-weights` (edit,
others, background; default the shipped config's 1 0 0).

Printed for both, and for two rules for tokens that straddle regions: the push on each
token's log-probability at ratio 1 (minus the row loss's gradient, times the T tokens of
the image, so whole-image Flow-GRPO's push is the advantage A on every token) under
- `apportioned` (now, `objectives.spatialflow.token_credit`): each region's term on its own
  advantage, weighted by its cover of the token;
- `blended` (before issue 23): each token one advantage, the cover-weighted blend of its
  regions', in the same region-weighted aggregation (a zero-weight region's advantage
  reaches the edit region's edge tokens through the blend).
Over the tokens of the instructed new place (`geometry.target_region` minus the object's
old place, at token resolution): the share that lies in each region, for rollouts that
failed the move (the translation reward's success flag: moved the instructed way); the mean
push there in failed and in moved rollouts; and the correlation, over rollouts, between that
mean push and the rollout's group-normalised edit score. A positive correlation is the
credit the update needs: raise the new place's likelihood in rollouts that moved the object
there, lower it in those that did not.
"""

import argparse
import math

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="held-out conditions")
    parser.add_argument("--group", type=int, default=8, help="rollouts per condition (G)")
    parser.add_argument("--batch", type=int, default=4, help="conditions per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--region-weights",
        type=float,
        nargs=3,
        default=[1.0, 0.0, 0.0],
        metavar=("EDIT", "OTHERS", "BACKGROUND"),
        help="the loss's region weights (default: configs/spatialflow.yaml's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.modules import SpatialFlowGRPOModule
    from lit_grpo.objectives.spatialflow import token_credit
    from lit_grpo.perception import geometry as geo
    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.rewards import RegionReward, Scorer, TranslationReward
    from lit_grpo.rewards.base import EditSpec
    from lit_grpo.sampling.strategies import EarlyExit

    g = args.group
    region_reward = RegionReward([TranslationReward(1.0, move_fraction=0.25)])
    module = SpatialFlowGRPOModule(
        TinyEditPolicy(weights="shapeworld-sft"),
        [region_reward],
        group_size=g,
        sample_steps=10,
        strategy=EarlyExit(4),
        noise_level=1.0,
        region_weights=dict(zip(("edit", "others", "background"), args.region_weights)),
    )
    module.eval()
    weights = torch.tensor(args.region_weights)
    rules = {"apportioned": token_credit, "blended": blended_credit}
    success = Scorer([TranslationReward(1.0, move_fraction=0.25)], module.scorer.segmenter)
    data = ShapeWorld("test", args.n, 32, ("translate",), objects=(2, 3), seed=0)
    # (target, rule) -> per rollout: share per region [3], push there, edit advantage, moved
    rows = {(t, rule): [] for t in (True, False) for rule in rules}
    for start in range(0, args.n, args.batch):
        batch = torch.utils.data.default_collate(
            [data[i] for i in range(start, min(start + args.batch, args.n))]
        )
        gen = torch.Generator().manual_seed(args.seed * 100003 + start)
        with torch.no_grad():
            record = module.sample(batch, gen)
        ok = success(record.images, batch, g).parts["translation_success"] > 0.5
        before = module.scorer.segmenter(batch["source"], list(batch["object"]))
        spec = EditSpec.from_batch(batch)
        place = (
            geo.target_region(
                before,
                spec.task,
                spec.direction,
                spec.angle,
                spec.factor,
                tuple(batch["source"].shape[-2:]),
                region_reward.move_fraction,
            )
            & ~before.mask.bool()
        )
        new = module.policy.pixel_to_tokens(place.float()).repeat_interleave(g, 0)  # [N, T]
        for target in (True, False):
            region_reward.target = target
            scores = module.scorer(record.images, batch, g)
            _, targets = module.advantages(scores, record)
            edit = scores.regions["regions"].regions[:, 0].view(-1, g)
            edit_adv = (edit - edit.mean(1, keepdim=True)) / (edit.std(1, keepdim=True) + 1e-4)
            mass = new.sum(1).clamp_min(1e-8)
            share = (targets.cover * new[:, None]).sum(-1) / mass[:, None]  # [N, 3]
            keep = new.sum(1) > 0
            tokens = new.shape[1]
            for rule, credit in rules.items():
                push = credit(targets.regions, targets.cover, weights) * tokens  # [N, T]
                there = (push * new).sum(1) / mass
                stats = [share, there[:, None], edit_adv.reshape(-1, 1), ok.float()[:, None]]
                rows[target, rule].append(torch.cat(stats, 1)[keep])
        print(f"  {min(start + args.batch, args.n)}/{args.n} conditions", flush=True)

    print(
        f"\ncredit at the instructed new place, SFT editor, {args.n} held-out 2-3 object "
        f"translations x G = {g}, region weights {args.region_weights}\n"
    )
    print(
        f"{'edit region':<26} {'rule':<12} {'rollouts':>8} {'failed':>7}  "
        f"failed: edit/others/bg   push | failed   push | moved   "
        f"corr(push, edit adv) [95% CI]"
    )
    for (target, rule), parts in rows.items():
        t = torch.cat(parts).double()
        share, push, edit_adv, ok = t[:, :3], t[:, 3], t[:, 4], t[:, 5] > 0.5
        r = torch.corrcoef(torch.stack([push, edit_adv]))[0, 1].item()
        z, half = math.atanh(r), 1.96 / math.sqrt(max(len(t) - 3, 1))
        name = "old + drawn + instructed" if target else "old + drawn places only"
        s = share[~ok].mean(0).tolist()
        print(
            f"{name:<26} {rule:<12} {len(t):>8} {(~ok).float().mean().item():>7.3f}  "
            f"{s[0]:.3f} / {s[1]:.3f} / {s[2]:.3f}      "
            f"{push[~ok].mean().item():+.3f}        {push[ok].mean().item():+.3f}     "
            f"{r:+.3f} [{math.tanh(z - half):+.3f}, {math.tanh(z + half):+.3f}]"
        )


def blended_credit(region_adv, cover, region_weights):
    """The push per token [N, T] at ratio 1 under the rule before issue 23: each token's
    advantage the cover-weighted blend of its regions' (region_adv [N, R]), each region the
    cover-weighted mean of its tokens, rows the weighted mean of the regions present."""
    blend = (region_adv[:, :, None] * cover).sum(1) / cover.sum(1).clamp_min(1e-8)  # [N, T]
    size = cover.sum(-1)  # [N, R]
    present = region_weights[None] * (size > 0)
    share = present / present.sum(-1, keepdim=True).clamp_min(1e-8)  # [N, R]
    return (share[:, :, None] * cover / size[:, :, None].clamp_min(1e-8)).sum(1) * blend


if __name__ == "__main__":
    main()
