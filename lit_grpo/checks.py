"""Up-front checks on user input, so mistakes surface before training starts."""

import hashlib
import os
import tempfile
from functools import cache
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


class RunFailed(RuntimeError):
    """A run that cannot go on, for the reason its one-line message names (a reward that
    raised or broke its contract, a run that trains nothing). The CLI prints it without a
    traceback and exits 1; Lightning ends the logger's run as FAILED."""


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def local_copy(location: str | os.PathLike, what: str) -> Path:
    """The local file to read for a checkpoint or weights file named by a path or a URL.

    Every command that reads a checkpoint (`fit` / `validate` / `test --ckpt_path`, a policy's
    `weights:`, `edit --ckpt`, `export`) comes through here, and reads the file it returns
    with `read_checkpoint` (`weights_only=True`) or safetensors, never with an unpickling
    load: a checkpoint from elsewhere is data, not code. Lightning itself would load a
    `http(s)://` checkpoint with `weights_only=False`, running whatever the pickle holds.

    A plain path, or a `file://` URL, is that local file. Any other URL is fetched once per
    process into `$LIT_GRPO_CACHE` (default `~/.cache/lit_grpo`)/downloads/, named by a hash
    of the URL: `http(s)://` with the standard library (a 60 s timeout per read), other
    schemes (`s3://`, `gs://`, ...) through fsspec, which needs that scheme's package.
    """
    text = str(location)
    if not is_url(text):
        return Path(text).expanduser()
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        from urllib.parse import unquote, urlparse
        from urllib.request import url2pathname

        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                f"{what} {text}: a file:// URL must name a local file (file:///path/to/x.ckpt)"
            )
        return Path(url2pathname(unquote(parsed.path)))
    return _fetched(text, what)


@cache
def _fetched(url: str, what: str) -> Path:
    root = Path(os.environ.get("LIT_GRPO_CACHE") or Path.home() / ".cache" / "lit_grpo")
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "download"
    path = root / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_url(url) as source, open(partial, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        os.replace(partial, path)
    except ConfigError:
        raise
    except Exception as err:  # urllib / fsspec / OS errors: one line naming the URL
        partial.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise ConfigError(
            f"{what} {url} could not be fetched ({type(err).__name__}: {reason}). Check the "
            "URL, or download the file and pass its local path"
        ) from None
    return path


def _open_url(url: str):
    if url.lower().startswith(("http://", "https://")):
        from urllib.request import urlopen

        return urlopen(url, timeout=60)
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as err:  # fsspec: no package for this scheme
        raise ConfigError(
            f"cannot read {url}: {err}. Install the fsspec package for its scheme, or "
            "download the file and pass its local path"
        ) from None


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
