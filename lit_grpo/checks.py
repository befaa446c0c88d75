"""Up-front checks on user input, so mistakes surface before training starts."""

import os
import tempfile
from pathlib import Path


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove we can write there; raise a clear error if not."""
    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write the {what} at {path}: {err.strerror or err}. Choose a writable "
            "directory (see --help for the option) or fix its permissions"
        ) from None
    return path


def ensure_file(path: str | os.PathLike, what: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file() and not is_distributed_checkpoint(p):
        raise FileNotFoundError(f"{what} not found: {p.resolve()}. {hint}")
    return p


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint written by Lightning's ModelParallelStrategy: a folder of shards with the
    rest of the checkpoint (loops, hyper-parameters, callbacks) in `meta.pt`."""
    return Path(path).is_dir() and (Path(path) / "meta.pt").is_file()


class ConfigError(ValueError):
    """A user mistake in a config or argument; the CLI prints it without a traceback."""


def read_checkpoint(path: str | os.PathLike, what: str) -> dict:
    """A torch checkpoint as a dict, loaded with `weights_only=True` (never arbitrary pickles).

    A truncated or corrupt file, or one whose pickle needs more than tensors and plain values,
    is reported as not a readable checkpoint; we do not pass on torch's advice to retry with
    `weights_only=False`, which would run whatever code the file holds.
    """
    import pickle

    import torch

    if is_distributed_checkpoint(path):
        # a distributed checkpoint (ModelParallelStrategy): everything but the sharded
        # weights and optimiser state is in its meta.pt
        path = Path(path) / "meta.pt"
    try:  # mmap: only what is used is read (the hyper-parameters, not every tensor)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        reason = "it is truncated, corrupt or not a file torch.save wrote"
        if isinstance(err, pickle.UnpicklingError):
            reason = "it holds objects other than tensors and plain values, or is damaged"
        raise ConfigError(
            f"{what} {path} is not a readable checkpoint: {reason}. Pass a .ckpt written by "
            "a lit_grpo run (runs/<experiment>/<run>/checkpoints/)"
        ) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(
            f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint: pass a .ckpt "
            "written by a lit_grpo run"
        )
    return ckpt
