"""Talk2Move's sampling table in miniature: full trajectory vs sliding window vs early exit.

    python benchmarks/sampling_strategies.py --steps 40 --eval-n 512

Each strategy trains the same GRPO stage (configs/talk2move.yaml: the shipped SFT editor,
LoRA r16, G = 8, 4 conditions per step, translation + background rewards) for the same number
of steps from the same seed, then the resulting policy edits the same held-out translations
with the same ODE noise. Printed per strategy:

- NFE: network evaluations to sample one rollout / trained denoising steps per rollout;
- s/step: wall time of a whole GRPO step (sampling, rewards, update; exit-step probes of the
  adaptive variant included), mean over the steps after the first, with its sampling and
  update parts;
- reward and translation accuracy of the trained policy (ODE edits, 95% intervals), and the
  paired reward difference to the full trajectory on the very same edits (same sources, same
  noise), which is what "equal or better reward" is judged on.

Sized for two CPU cores: about 10 minutes at the defaults. Nothing else should run meanwhile
(two torch processes on two cores slow each other down several-fold).
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_edits import wilson  # noqa: E402


def build(config: str, seed: int):
    """The model and data of a config, exactly as `python -m lit_grpo fit` builds them."""
    from lit_grpo.cli import run_cli

    return run_cli(["--config", config, f"--seed_everything={seed}"], run=False)


def strategies(args):
    from lit_grpo.callbacks import EarlyExitSelector
    from lit_grpo.sampling.strategies import EarlyExit, FullTrajectory, SlidingWindow

    every = max(args.steps // 4, 1)
    return {
        "full": (FullTrajectory(), []),
        "window": (SlidingWindow(window=args.window, shift_every=every), []),
        "early-exit": (EarlyExit(exit_step=args.exit_step), []),
        "early-exit-auto": (
            EarlyExit(exit_step=args.exit_step),
            [EarlyExitSelector(candidates=[2, 4, 6, 8], every_n_steps=every)],
        ),
    }


class StepTimer(L.Callback):
    """Wall time and the module's own phase timings of every training step."""

    def __init__(self):
        self.steps, self.sampling, self.update, self._t = [], [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self._t)
        m = trainer.callback_metrics
        self.sampling.append(float(m["time/sampling"]))
        self.update.append(float(m["time/update"]))


@torch.no_grad()
def evaluate(module, dataset, batch_size: int, seed: int):
    """Per-sample total reward and translation success of ODE edits (a miss: reward NaN->min)."""
    from lit_grpo.perception import geometry as geo

    module.eval()
    rewards, success = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for i, batch in enumerate(loader):
        edits = module.edit(batch["source"], batch["instruction"], seed=seed + i)
        inputs = module.scorer.observe(edits, batch)  # segmented once for reward and accuracy
        total = module.scorer.judge(inputs).total
        ok = geo.translation_success(
            inputs.before, inputs.after, batch["direction"], tuple(batch["source"].shape[-2:])
        )
        rewards.append(total)
        success.append(torch.nan_to_num(ok, nan=0.0))
    module.train()
    return torch.cat(rewards), torch.cat(success)


def mean_ci(x: torch.Tensor) -> tuple[float, float]:
    x = x[torch.isfinite(x)].double()
    return x.mean().item(), 1.96 * x.std().item() / math.sqrt(max(len(x), 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/talk2move.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps per strategy")
    parser.add_argument("--eval-n", type=int, default=512, help="held-out translations")
    parser.add_argument("--exit-step", type=int, default=4, help="K of the fixed early exit")
    parser.add_argument("--window", type=int, default=4, help="W of the sliding window")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["full", "window", "early-exit", "early-exit-auto"],
        help="which rows to run (full is the reference of the speed-up and reward columns)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # the config logs to MLflow; keep the benchmark's throw-away runs out of ./mlruns
    store = tempfile.mkdtemp(prefix="lit_grpo_bench_")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    from lit_grpo.datamodules.shapeworld import ShapeWorld

    cli = build(args.config, args.seed)
    dm = cli.datamodule
    steps_per_rollout = cli.model.hparams.sample_steps
    dataset = ShapeWorld("test", args.eval_n, dm.hparams.resolution, ("translate",), seed=0)

    results = {}
    base_reward, base_ok = evaluate(cli.model, dataset, 64, args.seed)
    results["SFT (no GRPO)"] = dict(reward=base_reward, ok=base_ok)
    chosen = {k: v for k, v in strategies(args).items() if k in args.strategies}
    for name, (strategy, extra) in chosen.items():
        print(f"--- {name}: {args.steps} GRPO steps", file=sys.stderr, flush=True)
        L.seed_everything(args.seed, verbose=False)
        cli = build(args.config, args.seed)
        module = cli.model
        module.strategy = strategy
        timer = StepTimer()
        trainer = L.Trainer(
            max_steps=args.steps,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer, *extra],
        )
        start = time.perf_counter()
        trainer.fit(module, cli.datamodule)
        train_s = time.perf_counter() - start
        reward, ok = evaluate(module, dataset, 64, args.seed)
        plan = strategy.plan(steps_per_rollout, 0)
        k_hist = [h["exit_step"] for h in extra[0].history] if extra else []
        results[name] = dict(
            reward=reward,
            ok=ok,
            nfe=plan.nfe(steps_per_rollout) if not extra else None,
            step_s=sum(timer.steps[1:]) / max(len(timer.steps) - 1, 1),
            sampling_s=sum(timer.sampling[1:]) / max(len(timer.sampling) - 1, 1),
            update_s=sum(timer.update[1:]) / max(len(timer.update) - 1, 1),
            train_s=train_s,
            k_hist=k_hist,
        )

    ref = results.get("full")
    head = (
        f"{'strategy':<16} {'NFE':>5} {'s/step':>6} {'sample':>6} {'update':>6} {'speed-up':>8} "
        f"{'reward':>15} {'d reward vs full':>18} {'trans. acc':>10} {'95% CI':>13}"
    )
    print(
        f"\nTalk2Move sampling table, ShapeWorld translate ({args.config}), {args.steps} GRPO "
        f"steps each, evaluated on {args.eval_n} held-out edits ({steps_per_rollout} ODE steps)"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        r_mean, r_ci = mean_ci(r["reward"])
        acc = r["ok"].mean().item()
        lo, hi = wilson(r["ok"].sum().item(), len(r["ok"]))
        if "step_s" in r:
            nfe = f"{r['nfe'][0]}/{r['nfe'][1]}" if r["nfe"] else "auto"
            timing = f"{r['step_s']:6.2f} {r['sampling_s']:6.2f} {r['update_s']:6.2f}"
            speed = f"{ref['step_s'] / r['step_s']:7.2f}x" if ref else "      - "
        else:
            nfe, timing, speed = "-", f"{'-':>6} {'-':>6} {'-':>6}", "      - "
        if ref is not None and r is not ref:
            d = r["reward"] - ref["reward"]
            d_mean, d_ci = mean_ci(d)
            delta = f"{d_mean:+.3f}+-{d_ci:.3f}"
        else:
            delta = "-"
        print(
            f"{name:<16} {nfe:>5} {timing} {speed:>8} {r_mean:8.3f}+-{r_ci:.3f} {delta:>18} "
            f"{acc:10.3f} [{lo:.3f},{hi:.3f}]"
        )
    for name, r in results.items():
        if r.get("k_hist"):
            print(f"{name}: exit steps chosen by EarlyExitSelector over the run: {r['k_hist']}")
    print(
        "NFE: network evaluations per rollout (sampling) / trained steps per rollout. s/step: "
        "mean wall time of a GRPO step after the first (sample, update: its parts). reward: "
        "translation + background reward of ODE edits, mean +- 95% CI; d reward: paired "
        "difference to full on the same edits. trans. acc: moved the instructed way by > 5% "
        "of the side (Wilson 95% CI)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
