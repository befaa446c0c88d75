"""Why rotation does not move under GRPO: what the SFT editor's rollouts do on rotate tasks.

    python benchmarks/rotation_study.py --n 64 --group 8

For each exploration setting (SDE noise level, exit step K or the full trajectory), rolls
out G edits of each of n held-out rotate conditions with the GRPO stage's own sampler and
measures, from the segmenter's headings:
- copies: rollouts whose heading stays within 20 deg of the source's (no rotation);
- success: rollouts within 20 deg of the instructed rotation (RotationAccuracy's rule);
- groups >= 1: conditions with at least one successful rollout (what GRPO could reinforce);
- circ. std: within-group circular std of the achieved rotation, degrees;
- shape ok: rollouts whose object is still the source's shape (`geometry.shape_iou` >= the
  reward's `min_shape_iou`, 0.5), and "real successes": successes that also pass it;
- reward mean / std: the rotation reward (`RotationReward`: Talk2Move's rule, 0 under a
  10 deg turn, with the shape check), its mean and within-group std;
- found: rollouts in which the segmenter finds the triangle at all.
Chance for a heading drawn at random: 40 / 360 = 11% success.
"""

import argparse
import sys
import time

import torch


def circular_std(degrees: torch.Tensor) -> torch.Tensor:
    """Per row of [B, G] angles (NaN ignored): sqrt(-2 ln R) in degrees."""
    rad = torch.deg2rad(degrees)
    ok = torch.isfinite(rad)
    c = torch.where(ok, rad.cos(), 0.0).sum(1) / ok.sum(1).clamp_min(1)
    s = torch.where(ok, rad.sin(), 0.0).sum(1) / ok.sum(1).clamp_min(1)
    r = torch.hypot(c, s).clamp(1e-9, 1.0)
    return torch.rad2deg(torch.sqrt(-2 * torch.log(r)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="shapeworld-sft")
    parser.add_argument("--n", type=int, default=64, help="held-out rotate conditions")
    parser.add_argument("--group", type=int, default=8, help="rollouts per condition")
    parser.add_argument(
        "--settings", nargs="+", default=["1.0:4", "2.0:4", "1.0:8", "1.0:full", "2.0:full"],
        help="noise_level:K (K an exit step, or 'full' for the full trajectory)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception import ColourSegmenter
    from lit_grpo.perception.geometry import wrap_degrees
    from lit_grpo.policies.weights import load_policy
    from lit_grpo.rewards import EditSpec, RewardInputs, RotationReward
    from lit_grpo.sampling.rollout import RolloutSampler
    from lit_grpo.sampling.strategies import EarlyExit, FullTrajectory

    torch.set_grad_enabled(False)
    data = ShapeWorld("val", args.n, args.resolution, ("rotate",))
    batch = torch.utils.data.default_collate([data[i] for i in range(args.n)])
    policy = load_policy(args.weights).eval()
    seg = ColourSegmenter()
    g = args.group
    phrases = [o for o in batch["object"] for _ in range(g)]
    source = seg(batch["source"], batch["object"]).repeat_interleave(g)
    before = source.angle
    rotation = RotationReward()
    spec = EditSpec.from_batch(batch).repeat_interleave(g)
    sources = batch["source"].repeat_interleave(g, 0)
    instructions = [t for t in batch["instruction"] for _ in range(g)]
    instructed = batch["angle"].repeat_interleave(g)
    print(f"{args.n} held-out rotate conditions x G={g}, weights {args.weights}")
    head = (
        f"{'noise':>5} {'K':>5} {'found':>6} {'copies':>7} {'success':>8} {'groups>=1':>9} "
        f"{'circ. std':>9} {'shape ok':>8} {'real succ.':>10} {'groups>=1 real':>14} "
        f"{'reward':>7} {'reward std':>10} {'s':>6}"
    )
    print(head)
    print("-" * len(head))
    for setting in args.settings:
        noise, k = setting.split(":")
        strategy = FullTrajectory() if k == "full" else EarlyExit(int(k))
        sampler = RolloutSampler(10, 1.0, float(noise))
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        images = []
        for i in range(0, args.n, 16):
            plan = strategy.plan(10)
            src, instr = batch["source"][i : i + 16], batch["instruction"][i : i + 16]
            images.append(sampler(policy, src, instr, g, plan, gen).images)
        secs = time.perf_counter() - start
        images = torch.cat(images)
        after = seg(images, phrases)
        achieved = wrap_degrees(after.angle - before)  # NaN where not found
        error = wrap_degrees(achieved - instructed).abs()
        success = (error <= 20).float().view(-1, g)
        paid = rotation(RewardInputs(images, sources, instructions, spec, source, after))
        shaped = (paid.extras["shape_iou"] >= rotation.min_shape_iou).float().view(-1, g)
        real = success * shaped
        reward = paid.scores.view(-1, g)
        print(
            f"{float(noise):>5.1f} {k:>5} {after.found.float().mean():6.3f} "
            f"{(achieved.abs() <= 20).float().mean():7.3f} {success.mean():8.3f} "
            f"{(success.sum(1) > 0).float().mean():9.3f} "
            f"{circular_std(achieved.view(-1, g)).nanmean():9.1f} "
            f"{shaped.mean():8.3f} {real.mean():10.3f} {(real.sum(1) > 0).float().mean():14.3f} "
            f"{reward.mean():7.3f} {reward.std(1, unbiased=False).mean():10.3f} {secs:6.1f}",
            flush=True,
        )
    print(f"chance success for a random heading: {40 / 360:.3f}; success: within 20 deg.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
