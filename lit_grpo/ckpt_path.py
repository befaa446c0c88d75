"""What `--ckpt_path` may name, checked before Lightning loads it.

`fit` / `validate` / `test --ckpt_path` take a local file, a URL (fetched first:
`checks.local_copy`), Lightning's special names, or `last`: the newest `last.ckpt` of the
configured experiment's runs. The checkpoint is read with `weights_only=True` (never an
unpickling load, and Lightning's own load is made `weights_only=True` too) and refused, in
one line, when another stage wrote it, its policy has another architecture, or (for `fit`)
it belongs to another task or experiment: resuming would append to that run's history.
"""

from pathlib import Path

from lit_grpo.checks import ConfigError, ensure_file, local_copy, read_checkpoint

SPECIAL_CKPTS = {"last", "best", "hpc", "registry"}


def check_ckpt_path(config, subcommand: str | None) -> dict | None:
    """Check (and rewrite to the local file) `config.ckpt_path` of a subcommand's config;
    the checkpoint it names as a dict, or None when there is none to read."""
    ckpt = config.get("ckpt_path")
    if ckpt == "last":  # Lightning would look only in the new run's (empty) folder
        ckpt = config.ckpt_path = str(_latest_last_checkpoint(config))
    if "weights_only" in config:
        # Lightning loads a checkpoint with weights_only=False when asked to, and by
        # default for http(s) URLs: that unpickles, and so runs, whatever the file holds
        if config.weights_only is False:
            raise ConfigError(
                "--weights_only=false: lit_grpo never unpickles a checkpoint (that would "
                "run whatever code it holds); its checkpoints load with weights_only=True. "
                "Leave the flag out"
            )
        config.weights_only = True
    if not ckpt or ckpt in SPECIAL_CKPTS:
        return None
    what = "checkpoint (--ckpt_path)"
    # a URL is fetched and checked like a local file; Lightning then loads the local copy
    local = local_copy(ckpt, what)
    if not str(ckpt).lower().startswith("file:") and str(local) != str(ckpt):
        what = f"checkpoint (--ckpt_path) {ckpt}, fetched as"
    path = ensure_file(
        local,
        what,
        "Pass the path of a .ckpt written by a lit_grpo run (runs/<experiment>/"
        "<run>/checkpoints/), or leave --ckpt_path out to start fresh.",
    )
    checkpoint = read_checkpoint(path, what)
    config.ckpt_path = str(path)
    written = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    model = config.get("model")
    wanted = model.get("class_path") if hasattr(model, "get") else None
    if written and wanted and written != wanted:
        name, mine = written.rsplit(".", 1)[-1], wanted.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{what} {path}: this checkpoint was written by {name}; this config trains "
            f"{mine}. Resume with a checkpoint of a {mine} run, or start this stage from "
            f"the {name} policy with --model.init_args.policy.init_args.weights={path} "
            "and no --ckpt_path"
        )
    _check_policy_architecture(checkpoint.get("lit_grpo_policy"), model, what, path)
    if subcommand == "fit":
        _check_same_training(checkpoint, config, what, path)
    return checkpoint


def _latest_last_checkpoint(config) -> Path:
    """The newest `last.ckpt` (a file, or the folder of a distributed checkpoint) of the
    configured experiment's runs, for `--ckpt_path last`.

    Checkpoints sit in `<default_root_dir>/<experiment id>/<run id>/checkpoints/`; the id of
    an MLflow experiment (lit_grpo's logger) is looked up by name in its store. With another
    logger, every run folder under `default_root_dir` is searched.
    """
    root = Path(config.trainer.get("default_root_dir") or ".")
    init = _mlflow_logger_args(config)
    where, folders = f"under {root}", "*"
    if init is not None:
        name = init.get("experiment_name") or "lit_grpo"
        where = f"of experiment {name!r} under {root}"
        folders = _experiment_id(name, init.get("tracking_uri"), init.get("root") or "mlruns")
    found = [] if folders is None else list(root.glob(f"{folders}/*/checkpoints/last.ckpt"))
    if not found:
        raise ConfigError(
            f"--ckpt_path last: no run {where} has a checkpoints/last.ckpt. Pass the path of a "
            "checkpoint instead, or leave --ckpt_path out to start fresh"
        )
    # a distributed checkpoint is a folder: its meta.pt is written last, by rank 0
    written = lambda p: (p / "meta.pt" if p.is_dir() else p).stat().st_mtime  # noqa: E731
    return max(found, key=written).resolve()


def _experiment_id(name: str, tracking_uri: str | None, root: str) -> str | None:
    from lit_grpo.loggers import _store_lock, default_tracking_uri

    uri = tracking_uri or default_tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return None  # no store yet: no run either (and no store created for asking)
    from mlflow import MlflowClient

    with _store_lock(uri):
        experiment = MlflowClient(uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def _check_same_training(checkpoint: dict, config, what: str, path) -> None:
    """Refuse to resume a fit from a checkpoint of another task or experiment: it would
    continue that run, appending this training to its MLflow history (one run, two tasks)."""
    data = config.get("data")
    data = data.as_dict() if hasattr(data, "as_dict") else data
    tasks = ((data or {}).get("init_args") or {}).get("tasks") if isinstance(data, dict) else None
    written_tasks = (checkpoint.get("datamodule_hyper_parameters") or {}).get("tasks")
    init = _mlflow_logger_args(config)
    experiment = None if init is None else init.get("experiment_name") or "lit_grpo"
    written_experiment = checkpoint.get("mlflow_experiment")
    differ = []
    if tasks and written_tasks and list(tasks) != list(written_tasks):
        differ.append(f"tasks {list(written_tasks)} vs this config's {list(tasks)}")
    if experiment and written_experiment and experiment != written_experiment:
        differ.append(f"experiment {written_experiment!r} vs this config's {experiment!r}")
    if differ:
        raise ConfigError(
            f"{what} {path} was trained for another run ({'; '.join(differ)}): resuming would "
            "append this training to that run. Resume with a checkpoint of this config's runs "
            "(--ckpt_path last), or start from its weights with --model.init_args.policy."
            f"init_args.weights={path} and no --ckpt_path"
        )


def _check_policy_architecture(entry, model, what: str, path) -> None:
    """Refuse a checkpoint whose policy was built with other constructor values (width,
    depth, patch size, ...) than the config's: Lightning would fail deep inside
    `load_state_dict` with a list of tensor shapes."""
    if not entry or not hasattr(model, "get"):
        return
    policy = (model.get("init_args") or {}).get("policy")
    if not hasattr(policy, "get"):
        return
    wanted_class = str(policy.get("class_path", "")).rsplit(".", 1)[-1]
    if wanted_class and entry.get("class") and wanted_class != entry["class"]:
        raise ConfigError(
            f"{what} {path} holds a {entry['class']} policy; this config builds a "
            f"{wanted_class}. Use a config for the checkpoint's policy"
        )
    args = policy.get("init_args") or {}
    stored = entry.get("config") or {}
    diff = [
        f"{key}: checkpoint {stored[key]} vs config {args[key]}"
        for key in sorted(stored)
        if key not in ("vocabulary", "pretrained")  # a folder may move: a location, not a shape
        and key in args
        and args[key] is not None
        and args[key] != stored[key]
    ]
    if diff:
        raise ConfigError(
            f"{what} {path} was trained with another policy architecture ({'; '.join(diff)}); "
            "set the policy's init_args to the checkpoint's values"
        )
    if "lora" in entry:  # an adapter-only checkpoint: its frozen weights are rebuilt
        started, configured = entry.get("weights"), args.get("weights")
        if bool(started) != bool(configured):
            over = f"over `weights: {started}`" if started else "over the pretrained folder alone"
            want = f"weights: {started}" if started else "weights: null"
            raise ConfigError(
                f"{what} {path} holds a LoRA adapter trained {over}, and its frozen weights "
                f"are rebuilt from the config: set the policy's init_args {want}"
            )


def _mlflow_logger_args(config) -> dict | None:
    """The init_args of the config's logger if it is lit_grpo's MLflowLogger, else None."""
    logger = config.trainer.get("logger")
    logger = logger.as_dict() if hasattr(logger, "as_dict") else logger
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith(
        "lit_grpo.loggers.MLflowLogger"
    ):
        return logger.get("init_args") or {}
    return None
