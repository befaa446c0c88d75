"""Edit quality of one or more policies on held-out ShapeWorld seeds (ODE sampling).

    python benchmarks/eval_edits.py --weights untrained --weights shapeworld-sft --n 256

`--weights` takes a lit_grpo .ckpt, a .safetensors written by lit_grpo, a built-in name, or
`untrained` (random init, same architecture as the first file given, or the defaults).
Prints one row per (policy, task): sample count, how often the segmenter found the object,
translation distance and accuracy (with a 95% Wilson interval), rotation error and accuracy,
scale accuracy, and background L1 outside the object's before/after regions.
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
    return centre - half, centre + half


@torch.no_grad()
def evaluate(policy, dataset, batch_size: int, steps: int, seed: int, segmenter, progress):
    from lit_grpo import geometry as geo
    from lit_grpo.rewards import RewardInputs, RotationReward, ScaleReward, TranslationReward

    # the GRPO stage's own spatial rewards: each scores its task's rows, 0 elsewhere
    spatial = [
        TranslationReward(move_fraction=dataset.move_fraction),
        RotationReward(),
        ScaleReward(),
    ]

    rows = {t: [] for t in ("translate", "rotate", "scale")}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    for batch in progress(loader):
        src = batch["source"]
        edited = policy.edit(src, batch["instruction"], steps, generator=gen)
        before = segmenter(src, batch["object"])
        after = segmenter(edited, batch["object"])
        size = tuple(src.shape[-2:])
        keep = geo.outside_mask([batch["mask_before"], batch["mask_after"]])
        out = {
            "found": after.found.float(),
            "dist": geo.translation_distance(before, after, batch["direction"], size),
            "trans_ok": geo.translation_success(before, after, batch["direction"], size),
            "rot_err": geo.rotation_error(before, after, batch["angle"]),
            "scale_err": geo.scale_error(before, after, batch["factor"]),
            "l1": geo.background_l1(src, edited, keep),
            "reward": sum(
                r(RewardInputs(edited, src, batch, before, after)).scores for r in spatial
            ),
        }
        for i, task in enumerate(batch["task"]):
            rows[task].append({k: float(v[i]) for k, v in out.items()})
    return rows


def summarise(samples: list[dict], task: str) -> dict:
    n = len(samples)
    if n == 0:
        return {}
    found = sum(s["found"] for s in samples)

    def mean(key, missing):  # a miss counts as the worst outcome, not as a dropped sample
        vals = [missing if math.isnan(s[key]) else s[key] for s in samples]
        return sum(vals) / n

    rewards = [s["reward"] for s in samples]
    r_mean = sum(rewards) / n
    r_sd = math.sqrt(sum((r - r_mean) ** 2 for r in rewards) / max(n - 1, 1))
    row = {
        "n": n,
        "found": found / n,
        "l1": mean("l1", float("nan")),
        "reward": r_mean,
        "reward_ci": 1.96 * r_sd / math.sqrt(n),
    }
    if task == "translate":
        ok = sum(0 if math.isnan(s["trans_ok"]) else s["trans_ok"] for s in samples)
        row.update(dist=mean("dist", 0.0), acc=ok / n, ci=wilson(ok, n))
    elif task == "rotate":
        ok = sum(1 for s in samples if not math.isnan(s["rot_err"]) and s["rot_err"] <= 20)
        row.update(rot_err=mean("rot_err", 180.0) / 180, acc=ok / n, ci=wilson(ok, n))
    else:
        ok = sum(1 for s in samples if not math.isnan(s["scale_err"]) and s["scale_err"] <= 0.15)
        row.update(acc=ok / n, ci=wilson(ok, n))
    return row


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
    from lit_grpo.policies import TinyEditPolicy
    from lit_grpo.policies.weights import load_policy, read_policy_file
    from lit_grpo.rewards.segmenters import ColourSegmenter

    torch.set_grad_enabled(False)
    dataset = ShapeWorld(args.split, args.n, args.resolution, tuple(args.tasks), seed=args.seed)
    segmenter = ColourSegmenter()
    arch = next((read_policy_file(w)[1] for w in args.weights if w != "untrained"), {})
    results = []
    for weights in args.weights:
        if weights == "untrained":
            torch.manual_seed(args.seed)
            policy = TinyEditPolicy(**arch)
        else:
            policy = load_policy(weights)
        policy.eval()
        start = time.perf_counter()
        desc = weights[-40:]
        rows = evaluate(
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
            results.append((weights, task, summarise(rows[task], task), secs))

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
    for weights, task, r, _ in results:
        if not r:
            continue
        ci = f"[{r['ci'][0]:.3f},{r['ci'][1]:.3f}]"
        reward = f"{r['reward']:6.3f}+-{r['reward_ci']:.3f}"
        print(
            f"{weights[-34:]:<34} {task:<9} {r['n']:>4} {r['found']:6.3f} {reward:>15} "
            f"{fmt(r.get('dist'))} {r['acc']:6.3f} {ci:>13} {fmt(r.get('rot_err')):>7} "
            f"{r['l1']:6.3f}"
        )
    print(
        "reward: the task's spatial reward (GRPO's), mean +- 95% CI half-width. acc: translate = moved the instructed way by > 5% of the side; rotate = within 20 deg;"
        " scale = size ratio within 15% of the factor. A missed object counts as a failure."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
