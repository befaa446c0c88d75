"""`python -m lit_grpo <command>`: the entry point.

The top-level help is printed without importing Lightning (which alone takes ~9 s on two
cores); each command imports what it needs.
"""

import sys

LIGHTNING_COMMANDS = {
    "fit": "train a stage (SFT, GRPO, ...) from a YAML config",
    "validate": "run the validation loop of a config (optionally from --ckpt_path)",
    "test": "run the test loop of a config (optionally from --ckpt_path)",
    "predict": "run the predict loop of a config",
}

# name -> (module under lit_grpo.commands, help line); imported only when run
OTHER_COMMANDS = {
    "export": ("export", "write the policy of a lit_grpo checkpoint as a .safetensors file"),
    "compare": ("compare", "MLflow runs side by side (differing params, metrics) and a PNG"),
    "edit": ("edit", "edit one image with a checkpoint or built-in weights"),
    "expand": ("expand", "turn (image, object) annotations or photos into edit samples (jsonl)"),
    "serve-rewards": ("serve_rewards", "serve rewards over HTTP to trainers (RemoteReward)"),
}

HELP = """usage: python -m lit_grpo <command> [--config FILE.yaml] [options]

lit_grpo: reinforcement-learning post-training of flow-matching image-editing models.

commands:
{commands}

examples:
  python -m lit_grpo fit --config configs/sft.yaml
  python -m lit_grpo fit --config configs/sft.yaml --trainer.max_steps=200
  python -m lit_grpo fit --config configs/sft.yaml --print_config
  python -m lit_grpo fit --help          (every option of a command)
  python -m lit_grpo export runs/1/<run id>/checkpoints/last.ckpt editor.safetensors
  python -m lit_grpo compare             (the runs of the latest experiment, and their curves)
  python -m lit_grpo edit --image in.png --instruction "move the red circle left" --out out.png
  python -m lit_grpo expand --annotations objects.jsonl --out train.jsonl
  python -m lit_grpo serve-rewards --config configs/rewards/serve_spatial.yaml --port 8765

Runs are tracked in MLflow: a sqlite store under ./mlruns unless MLFLOW_TRACKING_URI is set
(`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` to browse); checkpoints go to
./runs/<experiment id>/<run id>/checkpoints.
"""


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        every = {**LIGHTNING_COMMANDS, **{k: v[1] for k, v in OTHER_COMMANDS.items()}}
        commands = "\n".join(f"  {name:<14} {text}" for name, text in every.items())
        print(HELP.format(commands=commands))
        return 0
    if argv[0] in ("-V", "--version"):
        from lit_grpo import __version__

        print(f"lit_grpo {__version__}")
        return 0
    command = argv[0]
    if command in OTHER_COMMANDS:
        import importlib

        from lit_grpo.checks import ConfigError

        module = importlib.import_module(f"lit_grpo.commands.{OTHER_COMMANDS[command][0]}")
        try:
            return module.main(argv[1:])
        except (ConfigError, FileNotFoundError, PermissionError) as err:
            print(f"lit_grpo {command}: error: {err}", file=sys.stderr)
            return 2
    if command not in LIGHTNING_COMMANDS:
        print(
            f"lit_grpo: unknown command {command!r}; choose one of: "
            f"{', '.join(LIGHTNING_COMMANDS)} (python -m lit_grpo --help)",
            file=sys.stderr,
        )
        return 2
    from lit_grpo.checks import ConfigError, RunFailed

    try:
        from lit_grpo.cli import run_cli

        cli = run_cli(None if from_shell else argv)
    except (ConfigError, FileNotFoundError, PermissionError) as err:
        print(f"lit_grpo {command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:  # a broken reward, a run that trains nothing: the run FAILED
        print(f"lit_grpo {command}: error: {err}", file=sys.stderr)
        return 1
    from lit_grpo.callbacks import StopOnSignal

    # a fit stopped by SIGINT / SIGTERM: 128 + the signal, as a shell reports it
    stops = [cb for cb in cli.trainer.callbacks if isinstance(cb, StopOnSignal)]
    return max((cb.exit_code for cb in stops), default=0)


if __name__ == "__main__":
    sys.exit(main())
