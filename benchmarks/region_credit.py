"""Where SpatialFlow-GRPO's token advantages put the edit's credit (issue 11, the main job).

    python benchmarks/region_credit.py --n 64 --group 8

The shipped SFT editor rolls out G edits of each held-out 2-3 object ShapeWorld translation
(test split) exactly as `configs/spatialflow.yaml` trains (early exit at K = 4 of 10 steps,
noise level 1). The same rollouts are scored by `RegionReward` twice: with the instructed
target place in the edit region (`target=True`, the default) and without it (the object's
old and drawn places only), and each gives the token advantage map that the update trains
on (`SpatialFlowGRPOModule.advantages`).

Printed for both: over the tokens of the instructed new place (`geometry.target_region`
minus the object's old place, at token resolution), the share that lies in each region and
the mean advantage they carry, for rollouts that failed the move (the region shares are
theirs) (the translation reward's
success flag: moved the instructed way) and for those that made it; and the correlation,
over rollouts, between that mean advantage and the rollout's group-normalised edit score.
A positive correlation is the credit the update needs: raise the new place's likelihood in
rollouts that moved the object there, lower it in those that did not.
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
    args = parser.parse_args()
    torch.set_num_threads(2)

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.modules import SpatialFlowGRPOModule
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
    )
    module.eval()
    success = Scorer([TranslationReward(1.0, move_fraction=0.25)], module.scorer.segmenter)
    data = ShapeWorld("test", args.n, 32, ("translate",), objects=(2, 3), seed=0)
    rows = {True: [], False: []}  # target -> per-rollout (share per region [3], adv, edit adv, ok)
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
            adv = (targets.tokens * new).sum(1) / mass
            keep = new.sum(1) > 0
            rows[target].append(
                torch.cat([share, adv[:, None], edit_adv.reshape(-1, 1), ok.float()[:, None]], 1)[
                    keep
                ]
            )
        print(f"  {min(start + args.batch, args.n)}/{args.n} conditions", flush=True)

    print(
        f"\ncredit at the instructed new place, SFT editor, {args.n} held-out 2-3 object "
        f"translations x G = {g}\n"
    )
    print(
        f"{'edit region':<28} {'rollouts':>8} {'failed':>7}  failed: edit/others/bg   "
        f"adv | failed   adv | moved   corr(adv, edit adv) [95% CI]"
    )
    for target in (True, False):
        t = torch.cat(rows[target]).double()
        share, adv, edit_adv, ok = t[:, :3], t[:, 3], t[:, 4], t[:, 5] > 0.5
        r = torch.corrcoef(torch.stack([adv, edit_adv]))[0, 1].item()
        z, half = math.atanh(r), 1.96 / math.sqrt(max(len(t) - 3, 1))
        name = "old + drawn + instructed" if target else "old + drawn places only"
        s = share[~ok].mean(0).tolist()
        print(
            f"{name:<28} {len(t):>8} {(~ok).float().mean().item():>7.3f}  "
            f"{s[0]:.3f} / {s[1]:.3f} / {s[2]:.3f}      "
            f"{adv[~ok].mean().item():+.3f}       {adv[ok].mean().item():+.3f}     "
            f"{r:+.3f} [{math.tanh(z - half):+.3f}, {math.tanh(z + half):+.3f}]"
        )


if __name__ == "__main__":
    main()
