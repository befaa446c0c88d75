"""Edit quality of one or more policies on held-out ShapeWorld seeds (ODE sampling).

    python benchmarks/eval_edits.py --weights untrained --weights shapeworld-sft --n 256

`--weights` takes a lit_grpo .ckpt, a .safetensors written by lit_grpo, a built-in name, or
`untrained` (random init, same architecture as the first file given, or the defaults).
Prints one row per (policy, task): sample count, how often the segmenter found the object,
translation distance and accuracy (with a 95% Wilson interval), rotation error and accuracy,
scale accuracy, and background L1 outside the object's before/after regions. The numbers are
`lit_grpo.metrics.EditMetrics`' (the metrics a LightningModule logs), the reward column the
GRPO stage's spatial rewards.
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
def evaluate(policy, dataset, batch_size: int, steps: int, seed: int, segmenter, progress):
    """`EditMetrics.compute()` ({task: {metric: value}}) and each task's per-edit spatial
    rewards (the GRPO stage's own: each scores its task's rows, 0 elsewhere)."""
    from lit_grpo.metrics import EditMetrics
    from lit_grpo.rewards import RotationReward, ScaleReward, Scorer, TranslationReward

    spatial = [
        TranslationReward(move_fraction=dataset.move_fraction),
        RotationReward(),
        ScaleReward(),
    ]
    scorer = Scorer(spatial, segmenter)
    metrics = EditMetrics(tasks=dataset.tasks)
    rewards = {t: [] for t in dataset.tasks}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    for batch in progress(loader):
        src = batch["source"]
        edited = policy.edit(src, batch["instruction"], steps, generator=gen)
        inputs = scorer.observe(edited, batch)  # segmented once for metrics and rewards
        metrics.update(src, edited, batch, inputs.before, inputs.after)
        reward = scorer.judge(inputs).total
        for task, value in zip(batch["task"], reward.tolist()):
            rewards[task].append(value)
    return metrics.compute(), rewards


def summarise(result: dict, rewards: list[float]) -> dict:
    """One table row: the task's metrics, a Wilson interval on its accuracy, the reward's mean
    and 95% CI half-width."""
    n = int(result["n"])
    r_mean = sum(rewards) / n
    r_sd = math.sqrt(sum((r - r_mean) ** 2 for r in rewards) / max(n - 1, 1))
    return {
        **result,
        "ci": wilson(round(result["accuracy"] * n), n),
        "reward": r_mean,
        "reward_ci": 1.96 * r_sd / math.sqrt(n),
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
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.perception.segmenters import ColourSegmenter
    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.policies.weights import load_policy, read_policy_file

    torch.set_grad_enabled(False)
    dataset = ShapeWorld(args.split, args.n, args.resolution, tuple(args.tasks), seed=args.seed)
    segmenter = ColourSegmenter()
    arch = next((read_policy_file(w)[1] for w in args.weights if w != "untrained"), {})
    rows = []
    for weights in args.weights:
        if weights == "untrained":
            torch.manual_seed(args.seed)
            policy = TinyEditPolicy(**arch)
        else:
            policy = load_policy(weights)
        policy.eval()
        start = time.perf_counter()
        desc = weights[-40:]
        results, rewards = evaluate(
            policy,
            dataset,
            args.batch_size,
            args.steps,
            args.seed,
            segmenter,
            partial(tqdm, desc=desc, file=sys.stderr, leave=False),
        )
        secs = time.perf_counter() - start
        for task in args.tasks:
            row = summarise(results[task], rewards[task]) if task in results else {}
            rows.append((weights, task, row, secs))

    head = (
        f"{'policy':<34} {'task':<9} {'n':>4} {'found':>6} {'reward':>15} {'dist':>6} "
        f"{'acc':>6} {'95% CI':>13} {'rot.err':>7} {'bg L1':>6}"
    )
    print(
        f"ShapeWorld {args.split} split, {args.resolution}px, {args.steps} ODE steps, "
        f"seed {args.seed}"
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
            f"{fmt(r.get('rotation_error')):>7} {r['background_l1']:6.3f}"
        )
    print(
        "reward: the task's spatial reward (GRPO's), mean +- 95% CI half-width. acc: translate = moved the instructed way by > 5% of the side; rotate = within 20 deg;"
        " scale = size ratio within 15% of the factor. A missed object counts as a failure."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
