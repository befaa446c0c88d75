"""What `RotationReward`'s shape check sees: shape IoU and the rotation rule on held-out rotate
edits that are exact, copied, blurred, or an editor's own.

    python benchmarks/shape_check.py --n 256 --weights shapeworld-sft

Rows: the exact targets, the source itself (standing still), the targets blurred by a
Gaussian of sigma 0.7 / 1.0 / 1.5 px, and each `--weights` policy's ODE edits (10 steps).
Columns: how often the segmenter finds the triangle and reads a heading, quantiles of
`geometry.shape_iou` (the edit's mask against the source's turned by the achieved turn), the
fraction at or above the reward's `min_shape_iou`, the mean of Talk2Move's rule alone
(`talk2move_rotation_score`), the mean of `RotationReward` (rule and shape check), and
rotation accuracy (within 20 deg of the instruction).
"""

import argparse
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="held-out rotate edits")
    parser.add_argument("--weights", action="append", default=[], help="policies to edit with")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)

    import torchvision.transforms.functional as TF

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception import ColourSegmenter
    from lit_grpo.perception import geometry as geo
    from lit_grpo.policies.weights import load_policy
    from lit_grpo.rewards import RotationReward, Scorer
    from lit_grpo.rewards.spatial import talk2move_rotation_score

    torch.set_grad_enabled(False)
    data = ShapeWorld("val", args.n, args.resolution, ("rotate",))
    batch = torch.utils.data.default_collate([data[i] for i in range(args.n)])
    seg = ColourSegmenter()
    before = seg(batch["source"], batch["object"])
    reward = RotationReward()
    scorer = Scorer([reward], seg)
    head = (
        f"{'images':34} {'found':>5} {'read':>5} {'IoU q05 / q25 / q50 / q75':>26} "
        f"{'>=' + str(reward.min_shape_iou):>6} {'rule':>6} {'reward':>6} {'acc.':>5}"
    )
    print(f"{args.n} held-out rotate edits at {args.resolution} px")
    print(head)
    print("-" * len(head))

    def row(name: str, images: torch.Tensor) -> None:
        inputs = scorer.observe(images, batch, before=before)  # what the reward sees
        after = inputs.after
        turn = geo.achieved_rotation(before, after)
        rule = torch.nan_to_num(talk2move_rotation_score(turn, batch["angle"]), nan=0.0)
        out = reward(inputs)
        paid, iou = out.scores, out.extras["shape_iou"]
        q = torch.nanquantile(iou, torch.tensor([0.05, 0.25, 0.5, 0.75])).tolist()
        acc = (geo.rotation_error(before, after, batch["angle"]) <= 20).float()
        quantiles = " / ".join(f"{v:.2f}" for v in q)
        print(
            f"{name:34} {after.found.float().mean():5.2f} {torch.isfinite(turn).float().mean():5.2f} "
            f"{quantiles:>26} {(iou >= reward.min_shape_iou).float().mean():6.2f} "
            f"{rule.mean():6.3f} {paid.mean():6.3f} {acc.mean():5.2f}",
            flush=True,
        )

    row("exact targets", batch["target"])
    row("the source (standing still)", batch["source"])
    for sigma in (0.7, 1.0, 1.5):
        row(f"exact targets, blur sigma {sigma} px", TF.gaussian_blur(batch["target"], 7, sigma))
    for weights in args.weights:
        policy = load_policy(weights).eval()
        gen = torch.Generator().manual_seed(0)
        edits = torch.cat(
            [
                policy.edit(
                    batch["source"][i : i + 64], batch["instruction"][i : i + 64], 10, generator=gen
                )
                for i in range(0, args.n, 64)
            ]
        )
        row(f"{weights[-32:]} (ODE)", edits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
