"""MLflow by default, with a local sqlite store, and image logging to any Lightning logger.

MLflow 3.17 refuses `file:` tracking stores, which is Lightning's `MLFlowLogger` default; we
point it at `sqlite:///<root>/mlflow.db` unless `MLFLOW_TRACKING_URI` (or `tracking_uri`) names
another store; a sqlite store's artifacts go to `artifacts/` beside its file. mlflow itself is imported by
Lightning only when the run starts.
"""

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lit_grpo.checks import ensure_writable_dir

DEFAULT_ROOT = "mlruns"


def default_tracking_uri(root: str | Path = DEFAULT_ROOT) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{ensure_writable_dir(root, 'MLflow store') / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """`artifacts/` beside a sqlite store's file (MLflow's own default is `./mlruns` of the
    working directory, wherever the store is); None, the server's choice, for other stores.
    It applies to experiments created from now on: an experiment keeps its location."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        return None
    return (Path(path).expanduser().resolve().parent / "artifacts").as_uri()


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with a working local default.

    Args:
        experiment_name: MLflow experiment (created on first use).
        run_name: the run's name in the MLflow UI; MLflow picks one if None.
        tracking_uri: store URI; default `MLFLOW_TRACKING_URI`, else a sqlite file in `root`.
        root: local directory for the default store and its artifacts.
        tags: extra run tags.
        run_id: continue this run (the CLI passes the one a `--ckpt_path` checkpoint was
            written by): metrics go on at their steps, the run is RUNNING again, and a
            parameter the run already has keeps its first value (MLflow refuses to change
            one; the resumed config is stored as `config.resumed.yaml`).
    """

    def __init__(
        self,
        experiment_name: str = "lit_grpo",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        root: str = DEFAULT_ROOT,
        tags: dict[str, str] | None = None,
        log_model: bool = False,
        run_id: str | None = None,
    ):
        uri = tracking_uri or default_tracking_uri(root)
        artifacts = artifact_location(uri)
        # alembic prints a dozen INFO lines when it creates the sqlite schema
        logging.getLogger("alembic").setLevel(logging.WARNING)
        with _store_lock(uri):  # MlflowClient(uri) creates a sqlite store's tables
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=uri,
                tags=tags,
                log_model=log_model,
                artifact_location=artifacts,
                run_id=run_id,
            )
        self._resumed_run = run_id is not None

    @property
    def resumed(self) -> bool:
        return self._resumed_run

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        """Log `metrics` at `step`, never a (key, step) the run already has.

        Lightning adds `epoch` to every call, and logs a step's training and validation
        metrics in two calls: `epoch` goes once a step. A resumed run re-trains the steps
        logged after its checkpoint (a run killed with `kill -9` logged them, then died), bit
        for bit with exact resume: those keep their first values (`_last_logged`).
        """
        if step is not None:
            last = self._last_logged_steps() if self._resumed_run else {}
            metrics = {k: v for k, v in metrics.items() if step > last.get(k, -1)}
            if "epoch" in metrics:
                if step == getattr(self, "_epoch_logged_at", None):
                    metrics.pop("epoch")
                self._epoch_logged_at = step
        if metrics:
            super().log_metrics(metrics, step)

    def _last_logged_steps(self) -> dict[str, int]:
        """{key: the last step the continued run has a value of it at}, read once."""
        if getattr(self, "_last_logged", None) is None:
            client = self.experiment
            keys = client.get_run(self.run_id).data.metrics
            self._last_logged = {
                key: max(m.step for m in client.get_metric_history(self.run_id, key))
                for key in keys
            }
        return self._last_logged

    @rank_zero_only  # as Lightning's: other ranks' `experiment` is a dummy
    def log_hyperparams(self, params) -> None:
        if self._resumed_run:
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

            have = self.experiment.get_run(self.run_id).data.params
            params = {k: v for k, v in _flatten_dict(_convert_params(params)).items()}
            params = {k: v for k, v in params.items() if k not in have}
        if params:
            super().log_hyperparams(params)

    def finalize(self, status: str = "success") -> None:
        """End the run with `status`; a run ended as KILLED (by `StopOnSignal`, before
        Lightning's own "success" at the end of every fit) stays KILLED."""
        if getattr(self, "_killed", False) and status == "success":
            return
        super().finalize(status)
        self._killed = status == "KILLED" and self._initialized

    @property
    @rank_zero_experiment
    def experiment(self):
        """The MlflowClient; the first access creates the store, experiment and run.

        MLflow creates (and migrates) a sqlite store's tables without a lock: two runs that
        start together on a fresh store both run `ALTER TABLE ... ADD COLUMN step`, and one
        dies with `duplicate column name: step`. Both would also look up the experiment, find
        none and create it twice. The constructor (which opens the store) and this first
        access therefore hold a file lock beside the store.
        """
        first_access = MLFlowLogger.experiment.fget
        if self._initialized:
            return first_access(self)
        with _store_lock(self._tracking_uri):
            client = first_access(self)
        if self._resumed_run:  # a stopped run goes on: no longer FINISHED or KILLED
            client.update_run(self.run_id, status="RUNNING")
        return client


def _store_lock(uri: str):
    """A file lock `<db file>.lock` beside a sqlite store on disk; no lock for other stores."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{path}.lock", timeout=600)


def log_image(trainer, key: str, image: Tensor | np.ndarray, step: int) -> None:
    """Log a uint8 [H, W, 3] image to every logger of the trainer that can store one."""
    array = image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    for logger in trainer.loggers:
        _log_one(logger, key, array, step)


def _log_one(logger: Logger, key: str, array: np.ndarray, step: int) -> None:
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, array, key=key.replace("/", "_"), step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, array, step, dataformats="HWC")
    elif hasattr(logger, "log_image"):  # wandb, neptune, comet
        logger.log_image(key=key, images=[array], step=step)
    elif getattr(logger, "log_dir", None):  # CSVLogger and friends: a PNG beside the metrics
        from PIL import Image

        path = Path(logger.log_dir) / "images" / f"{key.replace('/', '_')}_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


def log_text(trainer, name: str, text: str) -> None:
    """Store `text` as a file artifact `name` with every logger of the trainer that can."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, text, name)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(name, f"```\n{text}\n```", trainer.global_step)
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
