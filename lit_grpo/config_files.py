"""The config files' own text, for the CLI: which files `--config` named, their `${key}`
interpolations resolved again after the command line, and one-line errors for a file that
is not UTF-8 or interpolates a key that does not exist."""

import sys
from pathlib import Path

from lit_grpo.checks import ConfigError


def config_files(args) -> list[str]:
    """The files given with --config, in order."""
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    files = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def interpolate_after_overrides(config, files: list[str]) -> None:
    """Resolve the configs' `${key}` interpolations again against the final config.

    jsonargparse resolves them per file, before the command line: `run_name: spatialflow-
    G${model.init_args.group_size}` with `--model.init_args.group_size=4` named the run
    `spatialflow-G8`. A value that still reads as the file resolved it is resolved again
    with the values the run uses; one set later (on the command line, by a later file) is
    left alone. Only plain `${dotted.key}` references are resolved (no resolvers).
    """
    import re

    import yaml

    subcommand = config.get("subcommand")
    final = config[subcommand] if subcommand else config
    reference = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")
    for name in files:
        try:
            raw = yaml.safe_load(Path(name).read_text())
        except Exception:  # parsed already: a file read differently here is not ours to judge
            continue
        for key, text in interpolated_leaves(raw):
            wanted = reference.findall(text)
            if not wanted or key not in final or any(k not in final for k in wanted):
                continue
            as_filed = reference.sub(lambda m, raw=raw: str(value_in(raw, m[1])), text)
            if str(final[key]) != as_filed:
                continue  # overridden after the file (or not a plain reference)
            if reference.fullmatch(text):
                final[key] = final[wanted[0]]
            else:
                final[key] = reference.sub(lambda m: str(final[m[1]]), text)


def interpolated_leaves(tree, prefix: str = ""):
    """(dotted key, text) of every string leaf with a `${` in a YAML mapping."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from interpolated_leaves(value, f"{prefix}{key}.")
    elif isinstance(tree, str) and "${" in tree:
        yield prefix[:-1], tree


def value_in(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def not_utf8(files: list[str], err: UnicodeDecodeError) -> ConfigError:
    for name in files:
        data = Path(name).read_bytes() if Path(name).is_file() else b""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data[: bad.start].count(b"\n") + 1
            return ConfigError(
                f"config file {name} is not UTF-8 text (byte {data[bad.start]:#04x} on line "
                f"{line}); save it as UTF-8"
            )
    return ConfigError(f"a config file is not UTF-8 text ({err}); save it as UTF-8")


def bad_interpolation(files: list[str], err: Exception) -> ConfigError:
    """An OmegaConf error of a config (an interpolation of a missing key, bad syntax)."""
    import re

    message = str(err).strip().splitlines()[0]
    key = re.search(r"Interpolation key '([^']+)' not found", message)
    if key:
        needle = "${" + key[1] + "}"
        where = [f for f in files if Path(f).is_file() and needle in Path(f).read_text()]
        return ConfigError(
            f"config file {where[0] if where else ', '.join(files)}: {needle} names no key of "
            f"the config ({key[1]!r} not found). Check its spelling against the keys that "
            "--print_config lists"
        )
    return ConfigError(f"config file {', '.join(files) or '?'}: {message}")
