"""The Lightning subcommands (fit, validate, test, predict) through LightningCLI.

Models, data, loggers and callbacks are chosen with `class_path` in YAML; the typed
constructors are the schema, so a typo in a key is reported with its name. Configs may use
OmegaConf interpolation (`${data.init_args.resolution}`), resolved with the values the run uses
(command line included).
"""

import logging
import os
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from lit_grpo.checks import ConfigError, ensure_writable_dir
from lit_grpo.ckpt_path import check_ckpt_path
from lit_grpo.config_files import (
    bad_interpolation,
    config_files,
    interpolate_after_overrides,
    not_utf8,
)
from lit_grpo.policies.weights import resolve_weights_path

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lit_grpo.loggers.MLflowLogger"},
}


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
                name = self.config_filename
                if getattr(logger, "resumed", False):  # keep the first run's config
                    name = name.replace(".yaml", ".resumed.yaml")
                logger.experiment.log_text(logger.run_id, text, name)
                logger.log_hyperparams(_flatten(self.config.as_dict()))
            elif getattr(logger, "log_dir", None):
                path = Path(logger.log_dir) / self.config_filename
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """The MLflow run goes into the checkpoint: a fit resumed from it continues the run."""
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                checkpoint["mlflow_run_id"] = logger.run_id
                checkpoint["mlflow_experiment"] = logger._experiment_name
                return


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

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except UnicodeDecodeError as err:
            raise not_utf8(config_files(args), err) from None
        except Exception as err:
            from omegaconf.errors import OmegaConfBaseException

            if not isinstance(err, OmegaConfBaseException):
                raise
            raise bad_interpolation(config_files(args), err) from None
        interpolate_after_overrides(self.config, config_files(args))
        # before LightningCLI reads the checkpoint's hyper-parameters into the config
        self._check_checkpoint()

    def _parse_ckpt_path(self) -> None:
        """Keep the config's model arguments over the checkpoint's hyper-parameters.

        LightningCLI parses the hyper-parameters stored in a `--ckpt_path` checkpoint on top
        of the config, so `test --ckpt_path Y --model.init_args.eval_steps=2` would evaluate
        with the steps of training. A lit_grpo config always names the model (another
        stage's checkpoint is refused in `_check_checkpoint`), so the config and the command
        line decide; the checkpoint supplies the weights and the training state.
        """

    def _check_checkpoint(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        checkpoint = check_ckpt_path(config, subcommand)
        if checkpoint is not None and subcommand == "fit":  # a resumed fit continues its run
            self._resumed_run_id = checkpoint.get("mlflow_run_id")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            _check_training_length(config.trainer)
        _check_accelerator(config.trainer, [str(f) for f in config.get("config") or []])
        root = config.trainer.get("default_root_dir") or "."
        ensure_writable_dir(root, "output directory (trainer.default_root_dir)")
        logger = config.trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "class_path"):
            init = logger.get("init_args") or {}
            if str(logger.get("class_path", "")).endswith("lit_grpo.loggers.MLflowLogger"):
                if not (init.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")):
                    # the default store's folder; another store is not created in the cwd
                    ensure_writable_dir(init.get("root") or "mlruns", "MLflow store (logger root)")
                run_id = getattr(self, "_resumed_run_id", None)
                if run_id and not init.get("run_id"):  # a resumed fit continues its run
                    if logger.get("init_args") is None:
                        from jsonargparse import Namespace

                        logger["init_args"] = Namespace()
                    logger["init_args"]["run_id"] = run_id
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
            elif class_path in ("lit_grpo.metrics.CLIPScore", "lit_grpo.rewards.CLIPReward"):
                from lit_grpo.metrics.clip import check_clip_files

                check_clip_files(init.get("model", ""), init.get("pretrained", ""))
            elif isinstance(init.get("weights"), str):  # a policy's weights
                resolve_weights_path(init["weights"])

    def instantiate_trainer(self, **kwargs):
        from lightning.pytorch.callbacks import RichModelSummary

        from lit_grpo.callbacks import ModelSummary

        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's default summary prints a FLOPs count of 0 (nothing measured it)
        trainer.callbacks = [
            ModelSummary(cb._max_depth, **cb._summarize_kwargs)
            if type(cb) is RichModelSummary
            else cb
            for cb in trainer.callbacks
        ]
        quiet_trainer(trainer)
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            found = _user_error(err)
            if found is None:
                raise
            raise found from None


def _check_training_length(trainer) -> None:
    """A fit that would train nothing is a mistake, not a run to record as FINISHED."""
    if trainer.get("max_steps") == 0:
        raise ConfigError(
            "trainer.max_steps is 0: the fit would train nothing. Set --trainer.max_steps to "
            "the number of optimiser steps to train (-1: no limit, stop on max_epochs/max_time)"
        )
    if trainer.get("max_epochs") == 0:
        raise ConfigError(
            "trainer.max_epochs is 0: the fit would train nothing. Set --trainer.max_epochs "
            "to 1 or more, or leave it unset"
        )


def _check_accelerator(trainer, files: list[str]) -> None:
    """A GPU asked for on a machine without one (the strategy overlays ask for two): one line
    saying how to run on the CPU, where Lightning ends 40 lines of traceback with "No
    supported gpu backend found!"."""
    wanted = trainer.get("accelerator")
    if not isinstance(wanted, str) or wanted.lower() not in ("gpu", "cuda"):
        return
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    if CUDAAccelerator.is_available() or (wanted == "gpu" and MPSAccelerator.is_available()):
        return
    import re

    setting = re.compile(rf"^\s*accelerator:\s*['\"]?{wanted}\b", re.MULTILINE)
    where = [f for f in files if Path(f).is_file() and setting.search(Path(f).read_text())]
    source = f" (set by {where[-1]})" if where else ""
    raise ConfigError(
        f"trainer.accelerator is {wanted!r}{source}, but this machine has no GPU that torch "
        "can use. Add --trainer.accelerator=cpu to run on the CPU (a strategy overlay's ranks "
        "then run as CPU processes over gloo), or run where a GPU is"
    )


def _user_error(err: BaseException) -> ConfigError | None:
    """The user's mistake behind an error from building the classes of a config, if any.

    jsonargparse wraps a constructor's error in its own ("Does not validate against any of
    the Union subtypes ...", the original as `__cause__`), once per level of nesting. The
    mistake is a `ConfigError`, a ValueError raised by the `__init__` of a lit_grpo class
    itself (an argument check: its message names the argument), or a FileNotFoundError
    raised by lit_grpo code (a data or weights file the config names; the message names the
    key and the path).
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConfigError):
            return err
        if isinstance(err, FileNotFoundError) and _raised_by_lit_grpo(err):
            return ConfigError(str(err))
        if type(err) is ValueError:
            owner = _raising_constructor(err)
            if owner is not None:
                return ConfigError(f"{owner}: {err}")
        err = err.__cause__ or err.__context__
    return None


def _innermost_frame(err: BaseException):
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def _raised_by_lit_grpo(err: BaseException) -> bool:
    """Whether `err` was raised by lit_grpo's own code (its message is ours)."""
    frame = _innermost_frame(err)
    package = str(Path(__file__).resolve().parent)
    return frame is not None and frame.f_code.co_filename.startswith(package)


def _raising_constructor(err: BaseException) -> str | None:
    """The class name if `err` was raised by the `__init__` of a lit_grpo class, directly or
    through lit_grpo's own checks that it calls (`strategy.check_schedule`): every frame from
    that `__init__` inwards is lit_grpo's code, so the message is an argument check of ours."""
    package = str(Path(__file__).resolve().parent)
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    owner = None
    for frame in reversed(frames):  # innermost first
        if not frame.f_code.co_filename.startswith(package):
            break
        if frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is not None:
            owner = frame.f_locals["self"]  # keep going: the outermost such __init__ names it
    return type(owner).__name__ if owner is not None else None


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


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


LIGHTNING_TIPS = _DropMessages("💡 Tip: For seamless cloud logging")


def quiet_lightning() -> None:
    """Silence what a normal run would print that the user cannot act on (and only that):
    Lightning's advert for litlogger; torch's LeafSpec deprecation, raised inside
    Lightning's own `_pytree.py`; and "Found N module(s) in eval mode", which our stages
    cause on purpose (frozen reward judges, segmenter and metric networks); WeightAveraging's
    note that a checkpoint loaded outside `fit` has no averaging state. Installed by the
    CLI, not at import of the library."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training"
    )
    # said on every validate / test / predict from a checkpoint, whose weights are the
    # average (what these should use): the warning itself says to ignore it
    warnings.filterwarnings(
        "ignore",
        message=r"You're using the WeightAveraging callback, but loading a checkpoint outside",
    )
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if LIGHTNING_TIPS not in rank_zero.filters:
        rank_zero.addFilter(LIGHTNING_TIPS)


def quiet_trainer(trainer) -> None:
    """What a normal run would print that depends on the trainer. WeightAveraging warns that
    it may run out of memory with any module that overrides `configure_model`: ours shards
    only under `ModelParallelStrategy`, where the warning stays (the filter lasts for the
    process: one command). Lightning's rich progress bar reads `Epoch 0/-2` on a `max_steps`
    run: ours reads `Epoch 0`."""
    from lightning.pytorch.callbacks import RichProgressBar as LightningRichProgressBar
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_grpo.callbacks import RichProgressBar

    if not isinstance(trainer.strategy, ModelParallelStrategy):
        warnings.filterwarnings(
            "ignore",
            message=r"You're using the WeightAveraging callback with a model that overrides "
            "the configure_model",
        )
    trainer.callbacks = [
        RichProgressBar(cb.refresh_rate, cb._leave, cb.theme, cb._console_kwargs)
        if type(cb) is LightningRichProgressBar
        else cb
        for cb in trainer.callbacks
    ]


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run a Lightning subcommand; `args` None reads sys.argv (LightningCLI's own rule)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    quiet_lightning()

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
