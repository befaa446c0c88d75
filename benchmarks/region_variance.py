"""RC-GRPO's premise, measured: how much of a group's reward spread comes from the background,
with independent vs region-decoupled noise (issue 11, benchmark a).

    python benchmarks/region_variance.py --n 64 --group 8

The shipped SFT editor rolls out G edits of each held-out ShapeWorld translation (test
split) from the same seeds under four samplers:

- ode / independent:  deterministic ODE (6 steps), every rollout its own initial noise;
- ode / region:       the same ODE, initial noise shared outside the edit region and
                      independent inside (RegionDecoupledNoise, perturbation 1): the paper's;
- sde / independent:  Talk2Move's early exit (SDE on steps 0-3 of 10, then the shortcut),
                      Flow-GRPO's independent noise;
- sde / region:       the same, initial and SDE noise decoupled (mask_sde): our extension.

The edit region is `perception.geometry.edit_region` (source detection + instruction, no
ground truth). Scored with configs/rcgrpo.yaml's rewards (translation 1.0, background 1.0,
attention concentration 0.5). Printed per sampler: the within-group variance (unbiased,
over the G rollouts of a condition) of the background reward and of the weighted total,
mean and 95% interval over conditions (normal approximation), and each reward's mean;
x 1e-4 where marked. Nothing else should run meanwhile (two torch processes on two cores
slow each other down several-fold).
"""

import argparse
import math
import time

import torch


def interval(values: torch.Tensor) -> tuple[float, float, float]:
    v = values.double()
    half = 1.96 * v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return v.mean().item(), v.mean().item() - half, v.mean().item() + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="held-out conditions")
    parser.add_argument("--group", type=int, default=8, help="rollouts per condition (G)")
    parser.add_argument("--batch", type=int, default=4, help="conditions per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.modules import RCGRPOModule
    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.rewards import (
        AttentionConcentrationReward,
        BackgroundReward,
        TranslationReward,
    )
    from lit_grpo.sampling.noise import IndependentNoise, RegionDecoupledNoise
    from lit_grpo.sampling.rollout import RolloutSampler
    from lit_grpo.sampling.strategies import EarlyExit, ODETrajectory

    rewards = [
        TranslationReward(1.0, move_fraction=0.25),
        BackgroundReward(1.0),
        AttentionConcentrationReward(0.5),
    ]
    module = RCGRPOModule(TinyEditPolicy(weights="shapeworld-sft"), rewards, group_size=args.group)
    module.eval()
    settings = {
        "ode / independent": (RolloutSampler(6, noise=IndependentNoise()), ODETrajectory()),
        "ode / region": (RolloutSampler(6, noise=RegionDecoupledNoise()), ODETrajectory()),
        "sde / independent": (RolloutSampler(10, noise=IndependentNoise()), EarlyExit(4)),
        "sde / region": (
            RolloutSampler(10, noise=RegionDecoupledNoise(mask_sde=True)),
            EarlyExit(4),
        ),
    }
    data = ShapeWorld("test", args.n, 32, ("translate",), seed=0)
    out = {name: {"background": [], "total": [], "means": []} for name in settings}
    seconds = dict.fromkeys(settings, 0.0)
    g = args.group
    for start in range(0, args.n, args.batch):
        items = [data[i] for i in range(start, min(start + args.batch, args.n))]
        batch = torch.utils.data.default_collate(items)
        regions = module.sample_regions(batch)
        for name, (sampler, strategy) in settings.items():
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(args.seed * 100003 + start)
            record = sampler(
                module.policy,
                batch["source"],
                list(batch["instruction"]),
                g,
                strategy.plan(sampler.steps),
                gen,
                attention=True,
                regions=regions,
            )
            seconds[name] += time.perf_counter() - t
            scores = module.score(record, batch)
            out[name]["background"].append(scores.parts["background"].view(-1, g).var(1))
            out[name]["total"].append(scores.total.view(-1, g).var(1))
            means = [scores.parts[k].mean() for k in ("translation", "background")]
            means.append(scores.parts["attention_concentration"].mean())
            out[name]["means"].append(torch.stack(means))
        print(f"  {min(start + args.batch, args.n)}/{args.n} conditions", flush=True)

    print(f"\nwithin-group reward variance, SFT editor, {args.n} held-out translations, G = {g}")
    print("(x 1e-4; mean [95% CI] over conditions)\n")
    head = f"{'sampler':<19} {'var background':>26} {'var total':>26}   "
    print(head + "translation  background  attention   s/rollout")
    for name in settings:
        bg = interval(torch.cat(out[name]["background"]) * 1e4)
        tot = interval(torch.cat(out[name]["total"]) * 1e4)
        means = torch.stack(out[name]["means"]).mean(0).tolist()
        per = seconds[name] / (args.n * g)
        print(
            f"{name:<19} {bg[0]:>9.3f} [{bg[1]:7.3f}, {bg[2]:7.3f}] "
            f"{tot[0]:>9.2f} [{tot[1]:7.2f}, {tot[2]:7.2f}]   "
            f"{means[0]:>10.3f} {means[1]:>11.4f} {means[2]:>10.3f}   {per:8.3f}"
        )


if __name__ == "__main__":
    main()
