"""Edit quality of one or more policies on held-out ShapeWorld seeds (ODE sampling).

    python benchmarks/eval_edits.py --weights untrained --weights shapeworld-sft --n 256

`--weights` takes a lit_grpo .ckpt, a .safetensors written by lit_grpo, a built-in name, or
`untrained` (random init, same architecture as the first file given, or the defaults).
Prints one row per (policy, task): sample count, how often the segmenter found the object,
translation distance and accuracy (with a 95% Wilson interval), rotation error and accuracy,
scale accuracy, and background L1 outside the object's before/after regions. The numbers are
`lit_grpo.metrics.EditMetrics`' (the metrics a LightningModule logs), the reward column the
GRPO stage's spatial rewards.

`--blend-margin PX` samples every policy with the source kept outside the scene's true edit
regions (the object before and after the edit, grown by PX pixels) at every step
(`SourceBlend`, Blended Latent Diffusion's step): the mask a user who marks the region would
give. Compare a trained policy with the SFT editor blended the same way.
"""

import argparse
import math
import sys
import time
from functools import partial

import torch


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(centre - half, 0.0), min(centre + half, 1.0)  # clamp rounding (p = 0 or 1)


@torch.no_grad()
def evaluate(
    policy, dataset, batch_size: int, steps: int, seed: int, segmenter, progress,
    blend_margin: int | None = None, device: str = "cpu",
):  # fmt: skip
    """`EditMetrics.compute()` ({task: {metric: value}}) and each task's per-edit spatial
    rewards (the GRPO stage's own: each scores its task's rows, 0 elsewhere). With
    `blend_margin`, the source is kept outside the true edit regions grown by that many
    pixels (`EditPolicy.edit`'s `editable`). The policy samples on `device` (its noise drawn
    on the CPU, so every device draws the same noise); the edits are scored on the CPU."""
    from lit_grpo.metrics import EditMetrics
    from lit_grpo.perception import geometry as geo
    from lit_grpo.rewards import RotationReward, ScaleReward, Scorer, TranslationReward

    spatial = [
        TranslationReward(move_fraction=dataset.move_fraction),
        RotationReward(),
        ScaleReward(),
    ]
    scorer = Scorer(spatial, segmenter)
    keep = {t: {"background": [], "others": []} for t in dataset.tasks}
    metrics = EditMetrics(tasks=dataset.tasks)
    rewards = {t: [] for t in dataset.tasks}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    for batch in progress(loader):
        src = batch["source"]
        regions = [batch["mask_before"], batch["mask_after"]]
        editable = None if blend_margin is None else ~geo.outside_mask(regions, blend_margin)
        if editable is not None:
            editable = editable.to(device)
        edited = policy.edit(
            src.to(device), batch["instruction"], steps, generator=gen, editable=editable
        ).cpu()
        inputs = scorer.observe(edited, batch)  # segmented once for metrics and rewards
        metrics.update(src, edited, batch, inputs.before, inputs.after)
        reward = scorer.judge(inputs).total
        # per edit, for intervals: L1 outside the object's true regions (the BackgroundL1
        # metric), and over the other objects of the scene (their pixels in the source)
        target = ~geo.outside_mask([batch["mask_before"], batch["mask_after"]], 1)
        others = segmenter.objects(src) & ~target
        bg = geo.background_l1(src, edited, ~target)
        oth = geo.background_l1(src, edited, others)
        oth[others.flatten(1).sum(1) == 0] = float("nan")  # a scene with no other object
        for i, (task, value) in enumerate(zip(batch["task"], reward.tolist())):
            rewards[task].append(value)
            keep[task]["background"].append(bg[i].item())
            keep[task]["others"].append(oth[i].item())
    return metrics.compute(), rewards, keep


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width of the finite values (NaN, NaN if none)."""
    x = [v for v in values if math.isfinite(v)]
    if not x:
        return float("nan"), float("nan")
    m = sum(x) / len(x)
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / max(len(x) - 1, 1))
    return m, 1.96 * sd / math.sqrt(len(x))


def summarise(result: dict, rewards: list[float], l1: dict[str, list[float]]) -> dict:
    """One table row: the task's metrics, a Wilson interval on its accuracy, the reward's, the
    background L1's and the other objects' L1's mean and 95% CI half-width."""
    n = int(result["n"])
    r_mean, r_ci = mean_ci(rewards)
    bg, bg_ci = mean_ci(l1["background"])
    oth, oth_ci = mean_ci(l1["others"])
    return {
        **result,
        "ci": wilson(round(result["accuracy"] * n), n),
        "reward": r_mean,
        "reward_ci": r_ci,
        "bg": bg,
        "bg_ci": bg_ci,
        "others": oth,
        "others_ci": oth_ci,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights",
        action="append",
        required=True,
        help="policy to evaluate (repeatable): .ckpt, .safetensors, built-in name, or 'untrained'",
    )
    parser.add_argument("--n", type=int, default=256, help="held-out samples per policy")
    parser.add_argument("--tasks", nargs="+", default=["translate", "rotate", "scale"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--steps", type=int, default=10, help="ODE steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--objects", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
        help="shapes per scene (2 3: multi-object scenes, as configs/spatialflow.yaml trains)",
    )  # fmt: skip
    parser.add_argument(
        "--blend-margin", type=int, metavar="PX",
        help="keep the source outside the true edit regions grown by PX pixels at every "
        "sampling step (an inference option; default: no blending)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cpu", help="where the policies sample (cpu, cuda); scored on the CPU"
    )
    args = parser.parse_args(argv)
    if args.blend_margin is not None and args.blend_margin < 0:
        parser.error(f"--blend-margin must be >= 0 pixels, got {args.blend_margin}")

    from tqdm import tqdm

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception.segmenters import ColourSegmenter
    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.policies.weights import load_policy, read_policy_file

    torch.set_grad_enabled(False)
    dataset = ShapeWorld(
        args.split, args.n, args.resolution, tuple(args.tasks), seed=args.seed,
        objects=tuple(args.objects),
    )  # fmt: skip
    segmenter = ColourSegmenter()
    arch = next((read_policy_file(w)[1] for w in args.weights if w != "untrained"), {})
    rows = []
    for weights in args.weights:
        if weights == "untrained":
            torch.manual_seed(args.seed)
            policy = TinyEditPolicy(**arch)
        else:
            policy = load_policy(weights)
        policy.eval().to(args.device)
        start = time.perf_counter()
        desc = weights[-40:]
        results, rewards, l1 = evaluate(
            policy,
            dataset,
            args.batch_size,
            args.steps,
            args.seed,
            segmenter,
            partial(tqdm, desc=desc, file=sys.stderr, leave=False),
            args.blend_margin,
            args.device,
        )
        secs = time.perf_counter() - start
        for task in args.tasks:
            row = summarise(results[task], rewards[task], l1[task]) if task in results else {}
            rows.append((weights, task, row, secs))

    head = (
        f"{'policy':<34} {'task':<9} {'n':>4} {'found':>6} {'reward':>15} {'dist':>6} "
        f"{'acc':>6} {'95% CI':>13} {'rot.err':>7} {'bg L1 (95% CI)':>17} "
        f"{'others L1 (95% CI)':>18}"
    )
    print(
        f"ShapeWorld {args.split} split, {args.resolution}px, {args.steps} ODE steps, "
        f"seed {args.seed}, {args.objects[0]}-{args.objects[1]} objects per scene"
        + (
            ""
            if args.blend_margin is None
            else f", source kept outside the true edit regions + {args.blend_margin} px"
        )
    )
    print(head)
    print("-" * len(head))
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    for weights, task, r, _ in rows:
        if not r:
            continue
        ci = f"[{r['ci'][0]:.3f},{r['ci'][1]:.3f}]"
        reward = f"{r['reward']:6.3f}+-{r['reward_ci']:.3f}"
        print(
            f"{weights[-34:]:<34} {task:<9} {r['n']:>4.0f} {r['found']:6.3f} {reward:>15} "
            f"{fmt(r.get('distance'))} {r['accuracy']:6.3f} {ci:>13} "
            f"{fmt(r.get('rotation_error')):>7} "
            f"{r['bg']:8.4f}+-{r['bg_ci']:.4f} {r['others']:9.4f}+-{r['others_ci']:.4f}"
        )
    print(
        "reward: the task's spatial reward (GRPO's), mean +- 95% CI half-width. acc: translate = moved the instructed way by > 5% of the side; rotate = within 20 deg;"
        " scale = size ratio within 15% of the factor (our thresholds). A missed object counts as"
        " a failure. bg L1: outside the object's true regions; others L1: over the other"
        " objects' pixels (scenes with another object only)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
