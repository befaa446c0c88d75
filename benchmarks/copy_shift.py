"""Where the scene's tokens copy from: the offset along the move (issue 23, the main job).

    python benchmarks/copy_shift.py --weights shapeworld-sft --weights runs/.../last.ckpt

The embedded editor draws a target token from the source tokens its attention reads (in its
last layers nearly all attention goes to the source grid). For every held-out 2-3 object
translation, at every ODE step, this takes each target token's attention over the source
grid in one layer (the last by default), renormalised, and the mean source position it
reads; the offset of that position from the token's own, projected on the instructed
direction, is in tokens: an object moved right by ShapeWorld's 8 px (two 4-px tokens) reads
from two tokens to its left, -2. A scene that is kept reads from its own place, 0; a scene
shifted along with the object reads from behind it, < 0. Printed per policy, averaged over
the steps and the edits:
- "bg shift": the offset of the tokens that lie wholly in the background (outside the edited
  object's true places grown by 1 px, and off every other object);
- "others shift": that of the tokens that touch another object (and not the edited one);
- "same place": the attention share of the source token at the token's own position, for
  the background tokens;
- "bg L1" and "others L1": `eval_edits.py`'s, on the same edits.
A background that is a colour gradient (ShapeWorld's are) changes colour where it is copied
from a shifted place, by the shift times the gradient: a per-edit colour offset whose sign
depends on the gradient and the move. The attention is read by a
forward hook through the layer's own `Attention.probabilities` (`TinyEditPolicy` only).
"""

import argparse
import sys

import torch


def copy_offset(attention: torch.Tensor, rows: int, cols: int, direction: torch.Tensor):
    """[N, T] offsets along `direction` [N, 2] (x right, y down; unit) in tokens, from
    target-to-source attention [N, T, T] over a rows x cols grid (row-major): per target token,
    the attention-weighted mean source position minus its own."""
    grid = torch.arange(rows * cols, device=attention.device)
    r, c = (grid // cols).to(attention), (grid % cols).to(attention)
    weights = attention / attention.sum(-1, keepdim=True)
    dr = weights @ r - r  # [N, T]
    dc = weights @ c - c
    return dc * direction[:, :1].to(dc) + dr * direction[:, 1:].to(dr)


def token_regions(before, after, others, patch: int):
    """[N, T] bool masks: tokens wholly in the background (outside the edited object's true
    places grown by 1 px and off every other object), and tokens that touch another object
    and not the edited object's places."""
    import torch.nn.functional as F

    from lit_grpo.perception import geometry as geo

    edit = ~geo.outside_mask([before, after], 1)
    pool = lambda m: F.max_pool2d(m.float()[:, None], patch)[:, 0].flatten(1) > 0  # noqa: E731
    touches_edit, touches_others = pool(edit), pool(others)
    return ~touches_edit & ~touches_others, touches_others & ~touches_edit


class SourceAttention:
    """A forward hook on one `tiny.Attention`: keeps the target tokens' attention over the
    source tokens of each call ([N, T, T], averaged over heads), from the layer's own
    `probabilities` (its LoRA included)."""

    def __init__(self, tokens: int):
        self.tokens, self.maps = tokens, []

    def __call__(self, module, args, output):
        x, rope, key_mask = args[:3]
        t = x.shape[1]  # [text | source | target]
        probs = module.probabilities(x, rope, key_mask, slice(t - self.tokens, None))
        self.maps.append(probs[..., t - 2 * self.tokens : t - self.tokens].mean(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", action="append", required=True, help="policy (repeatable)")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="ODE steps")
    parser.add_argument("--layer", type=int, default=-1, help="attention layer (default: last)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception import geometry as geo
    from lit_grpo.perception.segmenters import ColourSegmenter
    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.policies.weights import load_policy

    torch.set_grad_enabled(False)
    dataset = ShapeWorld("test", args.n, 32, ("translate",), seed=args.seed, objects=(2, 3))
    segmenter = ColourSegmenter()
    rows = []
    for weights in args.weights:
        policy = load_policy(weights).eval()
        if not isinstance(policy, TinyEditPolicy):
            parser.error(f"{weights}: copy_shift reads the embedded editor's attention only")
        patch = policy.denoiser.patch_size
        grid = policy.token_grid((32, 32))
        hook = SourceAttention(grid[0] * grid[1])
        handle = policy.denoiser.blocks[args.layer].attn.register_forward_hook(hook)
        gen = torch.Generator().manual_seed(args.seed)  # eval_edits.py's noise
        sums = torch.zeros(5)
        counts = torch.zeros(5)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)
        for batch in tqdm(loader, desc=weights[-40:], file=sys.stderr, leave=False):
            src = batch["source"]
            hook.maps.clear()
            edited = policy.edit(src, batch["instruction"], args.steps, generator=gen)
            keep = ~geo.outside_mask([batch["mask_before"], batch["mask_after"]], 1)
            others = segmenter.objects(src) & ~keep  # eval_edits.py's "others"
            bg, oth = token_regions(batch["mask_before"], batch["mask_after"], others, patch)
            for attention in hook.maps:  # one per ODE step
                shift = copy_offset(attention, *grid, batch["direction"])
                same = torch.diagonal(attention / attention.sum(-1, keepdim=True), 0, -2, -1)
                for i, (value, mask) in enumerate(((shift, bg), (shift, oth), (same, bg))):
                    sums[i] += value[mask].sum()
                    counts[i] += mask.sum()
            has_others = others.flatten(1).any(1)
            sums[3] += geo.background_l1(src, edited, ~keep).sum()
            counts[3] += len(src)
            sums[4] += geo.background_l1(src, edited, others)[has_others].sum()
            counts[4] += has_others.sum()
        handle.remove()
        rows.append((weights, *(sums / counts.clamp_min(1)).tolist()))

    layer = "the last layer" if args.layer == -1 else f"layer {args.layer}"
    print(
        f"ShapeWorld test split, {args.n} 2-3 object translations, {args.steps} ODE steps; "
        f"offsets along the instructed move, in tokens, in {layer}, mean over the steps"
    )
    head = (
        f"{'policy':<40} {'bg shift':>9} {'others shift':>12} {'same place':>10} "
        f"{'bg L1':>7} {'others L1':>9}"
    )
    print(head)
    print("-" * len(head))
    for w, bg, oth, same, bg_l1, oth_l1 in rows:
        print(f"{w[-40:]:<40} {bg:+9.3f} {oth:+12.3f} {same:10.3f} {bg_l1:7.4f} {oth_l1:9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
