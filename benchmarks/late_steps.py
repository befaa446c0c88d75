"""Which denoising steps carry a GRPO policy's background change (issue 11, the main job).

    python benchmarks/late_steps.py --weights runs/.../last.ckpt --n 512 --handoff 4

With early exit the GRPO stages train, and the KL holds, only the first K steps of 10 (the
high-noise ones); the rest run as a one-step shortcut in training and are never rescored.
This evaluates held-out 2-3 object translations (as `eval_edits.py --objects 2 3`) with a
hand-off sampler: the trained policy integrates the first `handoff` ODE steps, the shipped
SFT editor the rest, from the same noise. Printed per hand-off step: accuracy [95% CI],
background L1 and other objects' L1 (`eval_edits.py`'s definitions). Hand-off 10 is the
trained policy alone, 0 the SFT editor alone. If the trained steps alone (hand-off K) keep
the accuracy but not the background change, the change comes from the late, untrained steps.
"""

import argparse
import sys
from functools import partial

import torch


class HandOff(torch.nn.Module):
    """A policy-like `edit`: `first` integrates ODE steps [0, k), `rest` steps [k, steps)."""

    def __init__(self, first, rest, k: int):
        super().__init__()
        self.first, self.rest, self.k = first, rest, k

    @torch.no_grad()
    def edit(self, source, instructions, steps=10, shift=1.0, generator=None):
        from lit_grpo.sampling.flow import randn_like
        from lit_grpo.sampling.ode import sample_ode

        fns = [
            p.velocity_fn(p.encode_condition(source, instructions)) for p in (self.first, self.rest)
        ]
        calls = iter(range(steps))  # sample_ode calls the velocity once per step, in order

        def velocity(x, sigma):
            return fns[0 if next(calls) < self.k else 1](x, sigma)

        noise = randn_like(self.first.encode_images(source), generator)
        return self.first.decode(sample_ode(velocity, noise, steps, shift))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="the trained policy (.ckpt, ...)")
    parser.add_argument("--sft", default="shapeworld-sft", help="the policy of the later steps")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--handoff", type=int, nargs="+", default=[10, 4, 0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from eval_edits import evaluate, summarise
    from tqdm import tqdm

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception.segmenters import ColourSegmenter
    from lit_grpo.policies.weights import load_policy

    torch.set_grad_enabled(False)
    dataset = ShapeWorld("test", args.n, 32, ("translate",), seed=args.seed, objects=(2, 3))
    trained, sft = load_policy(args.weights).eval(), load_policy(args.sft).eval()
    print(f"{args.weights}: first k of {args.steps} ODE steps, then {args.sft}; n = {args.n}")
    print(
        f"{'k':>3} {'accuracy':>8} {'95% CI':>15} {'bg L1 (95% CI)':>18} {'others L1 (95% CI)':>19}"
    )
    for k in args.handoff:
        results, rewards, l1 = evaluate(
            HandOff(trained, sft, k), dataset, 64, args.steps, args.seed, ColourSegmenter(),
            partial(tqdm, desc=f"k={k}", file=sys.stderr, leave=False),
        )  # fmt: skip
        r = summarise(results["translate"], rewards["translate"], l1["translate"])
        print(
            f"{k:>3} {r['accuracy']:8.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] "
            f"{r['bg']:9.4f} ± {r['bg_ci']:.4f} {r['others']:10.4f} ± {r['others_ci']:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
