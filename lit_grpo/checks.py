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
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p.resolve()}. {hint}")
    return p


class ConfigError(ValueError):
    """A user mistake in a config or argument; the CLI prints it without a traceback."""
