"""The Lightning subcommands (fit, validate, test, predict) through LightningCLI.

Models, data, loggers and callbacks are chosen with `class_path` in YAML; the typed
constructors are the schema, so a typo in a key is reported with its name. Configs may use
OmegaConf interpolation (`${data.init_args.resolution}`), resolved per file.
"""

from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from lit_grpo.checks import ensure_file, ensure_writable_dir
from lit_grpo.policies.weights import resolve_weights_path

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lit_grpo.loggers.MLflowLogger"},
}
SPECIAL_CKPTS = {"last", "best", "hpc", "registry"}


class SaveConfigToLogger(SaveConfigCallback):
    """Save the resolved config with the run, for loggers that have no local `log_dir`.

    Lightning's SaveConfigCallback writes into `trainer.log_dir`, which is None with a
    sqlite-backed MLflow store (it then asserts). We log `config.yaml` as an MLflow artifact,
    the flattened config as run parameters (what `compare` diffs), and fall back to a file
    in `log_dir` for loggers that have one.
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, self.config_filename)
                logger.log_hyperparams(_flatten(self.config.as_dict()))
            elif getattr(logger, "log_dir", None):
                path = Path(logger.log_dir) / self.config_filename
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"init_args": {"lr": 1}}} -> {"model.lr": 1}. Lists of classes (callbacks)
    are keyed by class name, not position, so adding or dropping one callback changes only
    its own parameters in `compare`."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif _is_class_list(value):
            classes = [str(v["class_path"]).rsplit(".", 1)[-1] for v in value]
            for i, (item, cls) in enumerate(zip(value, classes)):
                label = cls if classes.count(cls) == 1 else f"{cls}[{i}]"
                flat[f"{name}.{label}"] = item["class_path"]
                flat.update(_flatten(item.get("init_args") or {}, f"{name}.{label}."))
        elif key not in ("config", "__path__"):
            flat[name.replace(".init_args", "")] = value
    return flat


def _is_class_list(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, dict) and "class_path" in v for v in value)
    )


class LitGRPOCLI(LightningCLI):
    """LightningCLI with lit_grpo's defaults (MLflow, `runs/`) and up-front input checks."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.get("default_root_dir") or "."
        ensure_writable_dir(root, "output directory (trainer.default_root_dir)")
        logger = config.trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "class_path"):
            init = logger.get("init_args") or {}
            if str(logger.get("class_path", "")).endswith("lit_grpo.loggers.MLflowLogger"):
                ensure_writable_dir(init.get("root") or "mlruns", "MLflow store (logger root)")
        if config.trainer.get("enable_progress_bar") is False and config.trainer.get("callbacks"):
            # a config's progress bar (PhaseProgressBar) would make Lightning refuse the flag
            config.trainer.callbacks = [
                c
                for c in config.trainer.callbacks
                if not str(getattr(c, "class_path", "")).endswith("ProgressBar")
            ]
        # name a missing weights file before anything is built (jsonargparse would bury the
        # error in a traceback of union-type attempts)
        for class_path, init in _classes_in(config.get("model")):
            if class_path == "lit_grpo.metrics.LPIPS":
                from lit_grpo.metrics.lpips import alexnet_weights

                alexnet_weights(init.get("weights"))
            elif class_path == "lit_grpo.metrics.CLIPScore":
                from lit_grpo.metrics.clip import check_clip_files

                check_clip_files(init.get("model", ""), init.get("pretrained", ""))
            elif isinstance(init.get("weights"), str):  # a policy's weights
                resolve_weights_path(init["weights"])
        ckpt = config.get("ckpt_path")
        if ckpt and ckpt not in SPECIAL_CKPTS and "://" not in str(ckpt):
            ensure_file(
                ckpt,
                "checkpoint (--ckpt_path)",
                "Pass the path of a .ckpt written by a lit_grpo run (runs/<experiment>/"
                "<run>/checkpoints/), or leave --ckpt_path out to start fresh.",
            )


def _classes_in(tree):
    """(class_path, init_args dict) of every class anywhere in a (nested) config."""
    if hasattr(tree, "as_dict"):
        tree = tree.as_dict()
    if isinstance(tree, dict):
        if isinstance(tree.get("class_path"), str):
            yield tree["class_path"], tree.get("init_args") or {}
        for value in tree.values():
            yield from _classes_in(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _classes_in(value)


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run a Lightning subcommand; `args` None reads sys.argv (LightningCLI's own rule)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    return LitGRPOCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToLogger,
        save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
