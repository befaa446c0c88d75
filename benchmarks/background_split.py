"""Where a policy's background change lies (issue 11, the main job).

    python benchmarks/background_split.py --weights shapeworld-sft --weights runs/.../last.ckpt

`eval_edits.py`'s background L1 is the mean |edit - source| outside the edited object's true
old and new places (each grown by 1 px), over held-out 2-3 object translations. This splits
that mean into the pixels it is made of, per policy, so the parts add up to it:
- drawn: where the edit drew the object (its detection grown by 1 px) outside its true
  places, i.e. a move that missed by a little;
- others: the other objects' pixels in the source;
- plain: the rest, the scene's own background;
and prints the plain background's L1 at each distance (Chebyshev, px) from every object,
whether the change is a halo around the objects or spread over the whole background, the
plain background's signed mean change (a shift of colour or brightness common to the edits
would show there), and its offset: per edit and channel, the plain background's mean change,
taken in absolute value (a shift of the whole background's colour in one edit, whichever
its sign; uniform noise of mean zero gives none). Printed beside it, "plain/px" is the
plain background's mean |change| per pixel; an offset equal to it would be a change that is
all a uniform shift.
"""

import argparse
import sys

import torch

DISTANCES = 8  # bins of 1..7 px from the nearest object, and 8 px or more


def split(source, edited, before, after, drawn, others):
    """Per edit [N]: the background L1's parts (drawn, others, plain; they sum to it), and the
    plain background's |diff| and pixel counts by distance from any object [N, DISTANCES], its
    signed mean change summed [N], its pixel count [N], and its offset (the mean over channels
    of |sum of the change| over its pixels) [N]: divided by the pixel count, the per-edit
    colour shift."""
    from lit_grpo.perception import geometry as geo

    objects = ~geo.outside_mask([before, after, drawn, others], 0)  # every object pixel
    keep = geo.outside_mask([before, after], 1)  # eval_edits.py's background
    count = keep.flatten(1).sum(1).clamp_min(1)
    drawn = ~geo.outside_mask([drawn], 1) & keep
    others = others & keep & ~drawn
    plain = keep & ~drawn & ~others
    change = edited.float() - source.float()
    diff, signed = change.abs().mean(1), change.mean(1)  # [N, H, W]: eval_edits' L1, the sign
    parts = {
        name: (diff * m).flatten(1).sum(1) / count
        for name, m in (("drawn", drawn), ("others", others), ("plain", plain))
    }
    distance = torch.full(diff.shape, DISTANCES - 1)
    grown = objects
    for d in range(DISTANCES - 1):  # the d-th 3x3 dilation reaches the pixels d + 1 px away
        wider = torch.nn.functional.max_pool2d(grown[:, None].float(), 3, 1, 1)[:, 0] > 0
        distance[wider & ~grown] = d
        grown = wider
    at = [plain & (distance == d) for d in range(DISTANCES)]
    by_distance = torch.stack([(diff * m).flatten(1).sum(1) for m in at], 1)
    pixels = torch.stack([m.flatten(1).sum(1) for m in at], 1).float()
    offset = (change * plain[:, None]).flatten(2).sum(2).abs().mean(1)  # [N]
    signed_sum, count_plain = (signed * plain).flatten(1).sum(1), plain.flatten(1).sum(1)
    return parts, by_distance, pixels, signed_sum, count_plain, offset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", action="append", required=True, help="policy (repeatable)")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="ODE steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception.segmenters import ColourSegmenter
    from lit_grpo.policies.weights import load_policy

    torch.set_grad_enabled(False)
    dataset = ShapeWorld("test", args.n, 32, ("translate",), seed=args.seed, objects=(2, 3))
    segmenter = ColourSegmenter()
    rows = []
    for weights in args.weights:
        policy = load_policy(weights)
        policy.eval()
        gen = torch.Generator().manual_seed(args.seed)  # eval_edits.py's noise
        totals = None
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)
        for batch in tqdm(loader, desc=weights[-40:], file=sys.stderr, leave=False):
            src = batch["source"]
            edited = policy.edit(src, batch["instruction"], args.steps, generator=gen)
            drawn = segmenter(edited, batch["object"]).mask
            out = split(
                src,
                edited,
                batch["mask_before"],
                batch["mask_after"],
                drawn,
                segmenter.objects(src),
            )
            parts, by_distance, pixels, signed, plain, offset = out
            sums = [*(v.sum() for v in parts.values()), by_distance.sum(0), pixels.sum(0)]
            sums += [signed.sum(), plain.sum(), offset.sum()]
            totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
        n = len(dataset)
        drawn_l1, others_l1, plain_l1 = (float(v) / n for v in totals[:3])
        per_px = float(totals[3].sum() / totals[4].sum())  # the plain background's |change|
        rows.append((weights, drawn_l1, others_l1, plain_l1, totals[3] / totals[4].clamp_min(1),
                     totals[4] / totals[4].sum(), float(totals[5] / totals[6]), per_px,
                     float(totals[7] / totals[6])))  # fmt: skip

    print(f"ShapeWorld test split, {args.n} 2-3 object translations, {args.steps} ODE steps")
    head = (
        f"{'policy':<40} {'bg L1':>7} {'drawn':>7} {'others':>7} {'plain':>7} {'signed':>8} "
        f"{'plain/px':>8} {'offset':>7}"
    )
    print(head)
    print("-" * len(head))
    for w, d, o, p, _, _, s, per_px, offset in rows:
        print(
            f"{w[-40:]:<40} {d + o + p:7.4f} {d:7.4f} {o:7.4f} {p:7.4f} {s:+8.4f} "
            f"{per_px:8.4f} {offset:7.4f}"
        )
    print("\nplain background L1 by distance from the nearest object (px, Chebyshev)")
    labels = [str(d + 1) for d in range(DISTANCES - 1)] + [f"{DISTANCES}+"]
    print(f"{'policy':<40} " + " ".join(f"{d:>6}" for d in labels))
    print(f"{'share of the plain pixels':<40} " + " ".join(f"{x:6.2f}" for x in rows[0][5]))
    for w, *_, l1, _, _, _, _ in rows:
        print(f"{w[-40:]:<40} " + " ".join(f"{x:6.4f}" for x in l1.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
