"""Held-out reward against training seconds: Flow-GRPO (full trajectory, early exit), Neighbor
GRPO on ODE rollouts and DiffusionNFT, from the same SFT editor (issue 22).

    python benchmarks/efficiency.py                 # the measurement: run alone on idle cores
    python benchmarks/efficiency.py --quick         # smoke test: 3 steps each, n = 16

Each method trains in its own process (`python -m lit_grpo fit --config <generated yaml>`),
one after the other, writing a checkpoint every `--eval-every` steps; then every checkpoint,
and step 0 (the built-in `shapeworld-sft` editor), edits the same `--n` held-out ShapeWorld
translations (test split, 10 ODE steps, the same noise for every policy) with
`benchmarks/eval_edits.py`'s `evaluate`. Per checkpoint: the translation reward's mean with
a 95% interval (normal approximation, eval_edits' `mean_ci`) and the translation accuracy
with a Wilson interval. Printed: a markdown table, then the target (Flow-GRPO full
trajectory's reward at its last step, 200) and, per other method, the first seconds at which
its held-out reward reaches it, the ratio to the full trajectory's seconds, and the paired
difference to the target on the same edits. Written: `<out>/efficiency.json` (every number,
per-edit rewards included) and the plot (`--plot`).

The four methods (shipped config, and what this script changes in it):

| method               | config                    | change                                   |
| -------------------- | ------------------------- | ---------------------------------------- |
| flow-grpo-full       | configs/talk2move.yaml    | strategy FullTrajectory (SDE on 0..8)     |
| flow-grpo-early-exit | configs/talk2move.yaml    | none (EarlyExit K = 4)                    |
| neighbor-grpo-ode    | configs/rcgrpo.yaml       | rewards (drops attention concentration)   |
| diffusion-nft        | configs/nft.yaml          | none                                      |

Comparable by construction (ours): every run gets the same rewards, `TranslationReward`
(weight 1, move 0.25) + `BackgroundReward` (weight 1): talk2move.yaml's and nft.yaml's as
shipped; rcgrpo.yaml adds RC-GRPO's `AttentionConcentrationReward` (weight 0.5), which is
dropped here, since a third reward changes what is optimised and the held-out score is the
translation reward alone. The rest is already common to the configs: task translate, 4
conditions x G = 8 rollouts per step, LoRA r16 on the same SFT weights, lr 3e-4, seed 0.
What stays each method's own: its sampling and objective, and rcgrpo.yaml's 6-step schedule
with region-decoupled initial noise (RC-GRPO's path to Neighbor GRPO, as shipped; the
others sample 10 steps). The held-out edits use 10 ODE steps for every policy.

Timing: the seconds of a checkpoint are Lightning's `Timer` (the callback `max_time` uses,
stored in every checkpoint) at the save: from the fit's `on_train_start` to the end of that
step, so process start-up, imports, model building and the sanity check are not counted;
checkpoint writes are (tens of ms each). Validation is off (`limit_val_batches: 0`) and the
evaluation runs after each fit ends, so neither is counted. The logger is Lightning's
CSVLogger (`<out>/<method>/logs`, for the training curves) instead of MLflow's sqlite store.
Start-up (the process's wall time minus its training seconds) is reported apart.

Budget: the reference (flow-grpo-full) trains `--reference-steps` (200) and runs first; every
other method trains until `--budget-seconds`, by default the reference's own training seconds
(a method that has not reached the target by then does not reach it in the reference's
time at all; `max_time` stops at the end of the step that passes it). `--budget-fraction f`
gives the others f times the reference's seconds instead (0.5 still decides a goal of "a
third of its seconds", in about half the time). `--budget-seconds` caps the reference too.
Checkpoints are about 14 MB each (`<out>/<method>/checkpoints`);
`--eval-only` scores the runs already in `--out` again without training; `--keep-finished`
trains only the methods without a finished run there (a stopped benchmark goes on).
"""

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_edits import evaluate, mean_ci, summarise  # noqa: E402

REFERENCE = "flow-grpo-full"
REWARDS = [
    {
        "class_path": "lit_grpo.rewards.TranslationReward",
        "init_args": {"weight": 1.0, "move_fraction": 0.25},
    },
    {"class_path": "lit_grpo.rewards.BackgroundReward", "init_args": {"weight": 1.0}},
]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    config: str
    model: dict = field(default_factory=dict)  # model.init_args replaced on top of the config


METHODS = {
    m.name: m
    for m in [
        Method(
            REFERENCE,
            "Flow-GRPO, full trajectory",
            "configs/talk2move.yaml",
            {"strategy": {"class_path": "lit_grpo.sampling.strategies.FullTrajectory"}},
        ),
        Method("flow-grpo-early-exit", "Flow-GRPO, early exit K=4", "configs/talk2move.yaml"),
        Method("neighbor-grpo-ode", "Neighbor GRPO (ODE)", "configs/rcgrpo.yaml"),
        Method("diffusion-nft", "DiffusionNFT", "configs/nft.yaml"),
    ]
}


def fit_config(method: Method, run_dir: Path, seed: int, max_steps: int, seconds: int, every: int):
    """The shipped config with the rewards, the stopping rule, the checkpoints and the logger
    of this benchmark (see the module docstring)."""
    cfg = yaml.safe_load((ROOT / method.config).read_text())
    cfg = copy.deepcopy(cfg)
    cfg["seed_everything"] = seed
    cfg["model"]["init_args"].update(copy.deepcopy({"rewards": REWARDS, **method.model}))
    h, rest = divmod(seconds, 3600)
    cfg["trainer"].update(
        max_steps=max_steps,
        max_time=f"00:{h:02d}:{rest // 60:02d}:{rest % 60:02d}",
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "logs"},
        },
        callbacks=[
            {"class_path": "lit_grpo.callbacks.StopOnSignal"},
            {
                "class_path": "lit_grpo.callbacks.ModelCheckpoint",  # + last.ckpt at a stop
                "init_args": {
                    "dirpath": str(run_dir / "checkpoints"),
                    "filename": "{step:06d}",
                    "every_n_train_steps": every,
                    "save_top_k": -1,
                    "save_last": True,
                },
            },
        ],
    )
    return cfg


def train(method: Method, run_dir: Path, args, max_steps: int, seconds: int) -> dict:
    """Run one fit in a fresh process; its wall time and the generated config's path."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(
            f"{run_dir} already holds a run: pass another --out, delete it, or re-evaluate "
            "it with --eval-only"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    cfg = fit_config(method, run_dir, args.seed, max_steps, seconds, args.eval_every)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = [sys.executable, "-m", "lit_grpo", "fit", "--config", str(config)]
    print(f"[{method.name}] {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(run_dir / "fit.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = (run_dir / "fit.log").read_text()[-3000:]
        raise SystemExit(f"[{method.name}] fit failed (exit {code}); {run_dir}/fit.log:\n{tail}")
    info = {"command": command, "wall_seconds": wall, "max_steps": max_steps, "budget": seconds}
    (run_dir / "fit.json").write_text(json.dumps(info, indent=1))
    return info


def checkpoints(run_dir: Path) -> list[tuple[int, float, Path]]:
    """(step, training seconds, path) of every checkpoint of a run, by step (one per step)."""
    from lit_grpo.checks import read_checkpoint

    found = {}
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        ckpt = read_checkpoint(path, "checkpoint")
        timer = ckpt.get("callbacks", {}).get("Timer")
        if timer is None:
            raise SystemExit(f"{path} has no Timer state: was the fit run with max_time?")
        found.setdefault(ckpt["global_step"], (timer["time_elapsed"]["train"], path))
    return [(step, secs, path) for step, (secs, path) in sorted(found.items())]


def score(policy, dataset, args) -> dict:
    """One policy on the held-out edits: eval_edits' row for translate, per-edit rewards kept."""
    from lit_grpo.perception.segmenters import ColourSegmenter

    policy.eval()
    results, rewards, l1 = evaluate(
        policy, dataset, args.batch_size, args.steps, args.seed, ColourSegmenter(), lambda x: x
    )
    row = summarise(results["translate"], rewards["translate"], l1["translate"])
    return {
        "n": int(row["n"]),
        "reward": row["reward"],
        "reward_ci": row["reward_ci"],
        "accuracy": row["accuracy"],
        "accuracy_ci": list(row["ci"]),
        "bg_l1": row["bg"],
        "rewards": rewards["translate"],
    }


def first_reaching(points: list[tuple[float, float]], target: float) -> float | None:
    """The seconds of the first point (seconds, reward), in time order, whose reward is at
    least `target`; None if none is."""
    return next((s for s, r in sorted(points) if r >= target), None)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width of a - b, edit by edit (the same edits, the same noise)."""
    return mean_ci([x - y for x, y in zip(a, b, strict=True)])


def summary(runs: dict, reference: str = REFERENCE) -> dict:
    """The target (the reference's last checkpoint), and per other method the first seconds
    its held-out reward reaches it, the ratio to the reference's seconds, the step and the
    paired difference there. `runs`: {method: [point, ...]}, each point a dict with step,
    seconds, reward and rewards (per edit), in step order."""
    ref = runs[reference][-1]
    out = {"reference": reference, "target": ref["reward"], "target_ci": ref["reward_ci"]}
    out.update(target_step=ref["step"], target_seconds=ref["seconds"], methods={})
    for name, points in runs.items():
        seconds = first_reaching([(p["seconds"], p["reward"]) for p in points], ref["reward"])
        hit = next((p for p in points if p["seconds"] == seconds), None)
        out["methods"][name] = {
            "seconds": seconds,
            "step": None if hit is None else hit["step"],
            "ratio": None if seconds is None else seconds / ref["seconds"],
            "difference": None
            if hit is None
            else paired_difference(hit["rewards"], ref["rewards"]),
            "trained_seconds": points[-1]["seconds"],
        }
    return out


def per_step_seconds(points: list[dict]) -> float:
    """Training seconds per step after the first checkpoint (its start-up-laden first step
    excluded); NaN with fewer than two checkpoints."""
    trained = [p for p in points if p["step"] > 0]
    if len(trained) < 2:
        return float("nan")
    a, b = trained[0], trained[-1]
    return (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])


def table(runs: dict, labels: dict) -> str:
    lines = [
        "| method | step | seconds | held-out reward [95% CI] | accuracy [95% CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, points in runs.items():
        for p in points:
            r, h = p["reward"], p["reward_ci"]
            lo, hi = p["accuracy_ci"]
            lines.append(
                f"| {labels[name]} | {p['step']} | {p['seconds']:.0f} | {r:.3f} "
                f"[{r - h:.3f}, {h + r:.3f}] | {p['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |"
            )
    return "\n".join(lines)


def report(result: dict, labels: dict) -> str:
    s = result["summary"]
    ref = s["reference"]
    lines = [
        f"Target: {labels[ref]} at step {s['target_step']}, held-out reward {s['target']:.3f} "
        f"+- {s['target_ci']:.3f} after {s['target_seconds']:.0f} s of training.",
        "",
        "| method | s/step | start-up s | trained s | first s reaching the target | step "
        "| ratio to the reference's s | reward - target there (paired 95% CI) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in s["methods"].items():
        run = result["methods"][name]
        reached = "not reached" if m["seconds"] is None else f"{m['seconds']:.0f}"
        step = "-" if m["step"] is None else str(m["step"])
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
        diff = "-" if m["difference"] is None else "{:+.3f} +- {:.3f}".format(*m["difference"])
        lines.append(
            f"| {labels[name]} | {run['seconds_per_step']:.2f} | {run['startup_seconds']:.0f} "
            f"| {m['trained_seconds']:.0f} | {reached} | {step} | {ratio} | {diff} |"
        )
    lines.append(
        "\ns/step: training seconds per step after the first checkpoint. start-up: the fit "
        "process's wall time minus its training seconds. The reference's own row is the "
        "first of its checkpoints whose reward reaches its last one's."
    )
    return "\n".join(lines)


def plot(result: dict, labels: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4.2), constrained_layout=True)
    ax_r, ax_a = fig.subplots(1, 2)
    for name, run in result["methods"].items():
        pts = run["points"]
        x = [p["seconds"] for p in pts]
        r = [p["reward"] for p in pts]
        h = [p["reward_ci"] for p in pts]
        (line,) = ax_r.plot(x, r, marker=".", label=labels[name])
        ax_r.fill_between(x, [a - b for a, b in zip(r, h)], [a + b for a, b in zip(r, h)],
                          color=line.get_color(), alpha=0.15)  # fmt: skip
        acc = [p["accuracy"] for p in pts]
        ax_a.plot(x, acc, marker=".", color=line.get_color(), label=labels[name])
        ax_a.fill_between(x, [p["accuracy_ci"][0] for p in pts],
                          [p["accuracy_ci"][1] for p in pts], color=line.get_color(),
                          alpha=0.15)  # fmt: skip
    s = result["summary"]
    ax_r.axhline(s["target"], color="grey", ls="--", lw=1, label="full trajectory's last step")
    ax_r.axvline(s["target_seconds"] / 3, color="grey", ls=":", lw=1, label="1/3 of its seconds")
    n = result["settings"]["n"]
    ax_r.set(xlabel="training seconds", ylabel=f"held-out translation reward (n={n}, 95% CI)")
    ax_a.set(xlabel="training seconds", ylabel="translation accuracy (Wilson 95% CI)")
    ax_r.legend(fontsize=8, loc="lower right")
    fig.suptitle("ShapeWorld translate, from the SFT editor")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n", type=int, default=256, help="held-out translations")
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument(
        "--budget-seconds", type=int, default=None,
        help="training seconds per method, the reference included (default: the "
        "reference's own training seconds for the others, and no cap on the reference)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-fraction", type=float, default=1.0,
        help="the others train this fraction of the reference's seconds (with no --budget-seconds)",
    )  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--out", type=Path, default=None, help="default runs/efficiency[-quick]")
    parser.add_argument("--plot", type=Path, default=None, help="default docs/img/efficiency.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="ODE steps of the held-out edits")
    parser.add_argument("--batch-size", type=int, default=64, help="held-out edits per batch")
    parser.add_argument("--eval-only", action="store_true", help="re-evaluate the runs in --out")
    parser.add_argument(
        "--keep-finished", action="store_true",
        help="train only the methods with no finished run (fit.json) in --out",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="3 steps each, n = 16: smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.reference_steps, args.eval_every = 16, 3, 1
    out = args.out or ROOT / ("runs/efficiency-quick" if args.quick else "runs/efficiency")
    plot_path = args.plot or (
        out / "efficiency.png" if args.quick else ROOT / "docs/img/efficiency.png"
    )
    methods = sorted(args.methods, key=lambda m: m != REFERENCE)  # the reference first
    if REFERENCE not in methods:
        raise SystemExit(f"--methods must include {REFERENCE}: its last step is the target")

    from lit_grpo.datamodules.shapeworld import ShapeWorld
    from lit_grpo.policies.weights import load_policy

    budget = args.budget_seconds
    fits = {}
    for name in methods:
        run_dir = out / name
        if args.eval_only or (args.keep_finished and (run_dir / "fit.json").exists()):
            fits[name] = json.loads((run_dir / "fit.json").read_text())
            print(f"[{name}] kept the finished run in {run_dir}", file=sys.stderr, flush=True)
        else:
            steps = args.reference_steps if name == REFERENCE or args.quick else -1
            cap = budget if budget is not None else 10 * 3600
            fits[name] = train(METHODS[name], run_dir, args, steps, cap)
        if name == REFERENCE and budget is None:
            budget = math.ceil(args.budget_fraction * checkpoints(run_dir)[-1][1])

    torch.set_grad_enabled(False)
    # the configs' data: 32 px, 1-3 objects per scene, move 0.25 of the side
    dataset = ShapeWorld("test", args.n, 32, ("translate",), seed=args.seed)
    start = time.perf_counter()
    sft = {"step": 0, "seconds": 0.0, **score(load_policy("shapeworld-sft"), dataset, args)}
    eval_seconds = time.perf_counter() - start
    result = {
        "settings": {**vars(args), "out": str(out), "plot": str(plot_path), "budget": budget},
        "methods": {},
    }
    for name in methods:
        points = [sft]
        ckpts = checkpoints(out / name)
        for step, secs, path in ckpts:
            points.append(
                {"step": step, "seconds": secs, **score(load_policy(str(path)), dataset, args)}
            )
            print(f"[{name}] step {step}: {points[-1]['reward']:.3f}", file=sys.stderr, flush=True)
        result["methods"][name] = {
            "label": METHODS[name].label,
            "config": str(out / name / "config.yaml"),
            "wall_seconds": fits[name]["wall_seconds"],
            "startup_seconds": fits[name]["wall_seconds"] - ckpts[-1][1],
            "seconds_per_step": per_step_seconds(points),
            "points": points,
        }
    result["eval_seconds_per_policy"] = eval_seconds
    result["summary"] = summary({k: v["points"] for k, v in result["methods"].items()})
    labels = {k: v["label"] for k, v in result["methods"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, labels, plot_path)
    print(
        f"ShapeWorld translate, test split, n = {args.n} held-out edits, {args.steps} ODE steps, "
        f"seed {args.seed}; reward = the translation reward (mean [95% CI])\n"
    )
    print(table({k: v["points"] for k, v in result["methods"].items()}, labels))
    print()
    print(report(result, labels))
    print(f"\nraw numbers: {out / 'efficiency.json'}; plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
