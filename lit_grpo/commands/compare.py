"""`python -m lit_grpo compare`: MLflow runs side by side, and their curves in one image.

Reads the store `fit` writes to (`./mlruns/mlflow.db`, or `MLFLOW_TRACKING_URI`) through
`MlflowClient`, prints one column per run (its name, id, status, duration), the parameters
that differ between the runs, and for every metric its last and best value with their steps,
then plots chosen metrics against the step, one panel per metric and one line per run.
Runs are filtered in Python after one `search_runs` per experiment, so run names and tag
values need no quoting for MLflow's filter syntax.
"""

import argparse
import fnmatch
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lit_grpo.checks import ConfigError, ensure_writable_dir

HELP = "compare MLflow runs: the params that differ, last and best metrics, a PNG of curves"

# lit_grpo.loggers.DEFAULT_ROOT; not imported from there because that module loads Lightning.
DEFAULT_STORE = Path("mlruns") / "mlflow.db"
LOWER_IS_BETTER = re.compile(
    r"(^|[^a-z])(loss|err|error|l1|l2|mse|lpips|kl|time|dist|distance|fid)([^a-z0-9]|$)"
)
BOOKKEEPING = ("epoch", "step", "lr-*")  # counters and schedules: a last value, no "best"
DEFAULT_CURVES = ("val/reward", "reward/total", "val/loss", "train/loss")
PANEL_PX = (640, 400)  # width, height of one panel in the image
DPI = 100
CELL = 28  # characters a run's column may take; longer values are cut with "~"

EPILOG = f"""\
which runs:
  no filter             every run of the latest experiment (the one with the newest run)
  --experiment          every run of the named experiments
  --runs / --tag        matching runs of --experiment, or of every experiment if none given
  At most --max-runs runs (the most recent) are compared.

best values:
  min for metrics whose name contains one of the words loss, err, error, l1, l2, mse,
  lpips, kl, time, dist, distance, fid (e.g. train/loss, time/sampling); max for every
  other metric (val/reward, reward/total, ...). {", ".join(BOOKKEEPING)} show only their
  last value. A '*' marks the run with the best value of a metric.

image:
  one panel of {PANEL_PX[0]}x{PANEL_PX[1]} px per metric, 2 panels a row (3 above 4 panels).
  Default metrics: those of {", ".join(DEFAULT_CURVES)} the runs logged.

store:
  --tracking-uri, else MLFLOW_TRACKING_URI, else ./{DEFAULT_STORE} (where `fit` logs when
  run in this directory). compare never creates a store.

examples:
  python -m lit_grpo compare
  python -m lit_grpo compare --experiment shapeworld-sft --metrics val/loss 'train/*'
  python -m lit_grpo compare --runs sft-32px 1f3623b5 --out sft.png
  python -m lit_grpo compare --tag sweep=lr --tracking-uri elsewhere/mlruns
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_grpo compare",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--experiment", nargs="+", metavar="NAME", help="experiment names (or ids) to compare"
    )
    parser.add_argument(
        "--runs", nargs="+", metavar="RUN", help="run names, run ids or id prefixes (>= 4 chars)"
    )
    parser.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs with this tag value (repeatable: all must hold)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="M",
        help="metrics to plot; shell-style patterns work ('reward/*')",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="image to write (.png, .pdf or .svg); default ./compare_<experiment>.png",
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--all-params", action="store_true", help="list identical parameters too")
    parser.add_argument(
        "--max-runs", type=int, default=10, metavar="N", help="compare at most N runs (10)"
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store: a URI, a .db file or a directory holding mlflow.db",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_runs < 1:
        parser.error(f"--max-runs must be >= 1, got {args.max_runs}")
    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--tag takes KEY=VALUE, got {item!r}")
        tags[key] = value
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix.lower() not in (".png", ".pdf", ".svg"):
            parser.error(f"--out must end in .png, .pdf or .svg, got {args.out!r}")
        ensure_writable_dir(out.parent, "output directory (--out)")
    uri = tracking_uri(args.tracking_uri)

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema checks print INFO lines
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        experiments = find_experiments(client, args.experiment, bool(args.runs or tags), uri)
        runs, total = find_runs(client, experiments, args.runs, tags, args.max_runs)
        histories = {
            run.info.run_id: {k: _history(client, run.info.run_id, k) for k in run.data.metrics}
            for run in runs
        }
    except MlflowException as err:
        raise ConfigError(f"reading the MLflow store {uri} failed: {err.message}") from None

    names = {e.experiment_id: e.name for e in experiments}
    scope = ", ".join(
        f"{names[i]} (id {i})" for i in dict.fromkeys(r.info.experiment_id for r in runs)
    )
    shown = f"{len(runs)} run{'s' * (len(runs) > 1)}"
    if total > len(runs):
        shown = f"the {len(runs)} newest of {total} runs (--max-runs)"
    metrics = [] if args.no_plot else choose_metrics(histories, args.metrics)
    print(f"store       {uri}\nexperiment  {scope}: {shown}\n")
    print(format_table(runs, histories, names, args.all_params))

    if args.no_plot:
        return 0
    if not metrics:
        print("\nno metrics logged yet: nothing to plot")
        return 0
    if out is None:
        slug = "+".join(names[i] for i in dict.fromkeys(r.info.experiment_id for r in runs))
        out = Path.cwd() / f"compare_{re.sub(r'[^A-Za-z0-9._-]+', '_', slug)[:80]}.png"
    width, height = plot(runs, histories, metrics, out)
    size = f"{width}x{height} px, " if out.suffix.lower() == ".png" else ""
    print(f"\nwrote {out} ({size}{len(metrics)} panels: {', '.join(metrics)})")
    return 0


def tracking_uri(option: str | None) -> str:
    """The store to read; an error (never a new, empty store) if a local one does not exist."""
    uri = option or os.environ.get("MLFLOW_TRACKING_URI")
    hint = (
        "`python -m lit_grpo fit` logs to ./mlruns/mlflow.db in the directory it runs in: run "
        "compare there, or name the store with --tracking-uri or MLFLOW_TRACKING_URI"
    )
    if not uri:
        if not DEFAULT_STORE.is_file():
            raise FileNotFoundError(
                f"no MLflow store here: {DEFAULT_STORE.resolve()} does not exist. {hint}"
            )
        return f"sqlite:///{DEFAULT_STORE.resolve()}"
    source = "--tracking-uri" if option else "MLFLOW_TRACKING_URI"
    if "://" not in uri:  # a path: a .db file or a directory holding mlflow.db
        path = Path(uri).expanduser()
        path = path / "mlflow.db" if path.is_dir() else path
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
    else:
        return uri  # a server or another backend: MLflow reports its own errors
    if not path.is_file():
        raise FileNotFoundError(f"the MLflow store {source}={uri} does not exist: {path.resolve()}")
    return f"sqlite:///{path.resolve()}"


def find_experiments(client, wanted: Sequence[str] | None, filtered: bool, uri: str) -> list:
    every = client.search_experiments(order_by=["last_update_time DESC"])
    if wanted:
        chosen = []
        for name in wanted:
            hits = [e for e in every if name in (e.name, e.experiment_id)]
            if not hits:
                known = ", ".join(e.name for e in every) or "none"
                raise ConfigError(f"no experiment {name!r} in {uri}; experiments there: {known}")
            chosen += hits
        return chosen
    if filtered:
        return every
    newest = client.search_runs(
        [e.experiment_id for e in every], max_results=1, order_by=["attributes.start_time DESC"]
    )
    if not newest:
        raise ConfigError(
            f"the store {uri} holds no runs yet; train one with "
            "`python -m lit_grpo fit --config configs/sft.yaml`"
        )
    return [e for e in every if e.experiment_id == newest[0].info.experiment_id]


def find_runs(client, experiments, selectors, tags: dict, max_runs: int) -> tuple[list, int]:
    """(runs to compare in column order, how many matched before the --max-runs cap)."""
    ids = [e.experiment_id for e in experiments]
    runs, token = [], None
    while True:  # newest first, every page
        page = client.search_runs(
            ids, max_results=1000, order_by=["attributes.start_time DESC"], page_token=token
        )
        runs += page
        token = page.token
        if not token:
            break
    where = ", ".join(e.name for e in experiments)
    every = runs
    runs = [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]
    if tags and not runs:
        known = sorted({k for r in every for k in r.data.tags if not k.startswith("mlflow.")})
        raise ConfigError(
            f"no run of {where} has the tags {tags}; tags there: {', '.join(known) or 'none'}"
        )
    if selectors:
        picked = {}  # run id -> run, in the order the user named them
        for sel in selectors:
            hits = [r for r in runs if _matches(r, sel)]
            if not hits:
                known = ", ".join(dict.fromkeys(r.info.run_name for r in runs[:20]))
                raise ConfigError(
                    f"no run named {sel!r} (or with that id) in {where}; runs there: {known}"
                )
            picked.update((r.info.run_id, r) for r in hits if r.info.run_id not in picked)
        runs = list(picked.values())
    total = len(runs)
    runs = runs[:max_runs]
    if not selectors:  # oldest on the left; with --runs, the order the user gave
        runs.reverse()
    return runs, total


def _matches(run, selector: str) -> bool:
    run_id = run.info.run_id
    return selector in (run.info.run_name, run_id) or (
        len(selector) >= 4 and run_id.startswith(selector)
    )


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in step order."""
    metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in metrics]


def lower_is_better(metric: str) -> bool:
    return bool(LOWER_IS_BETTER.search(metric.lower()))


def best(points: list[tuple[int, float]], metric: str) -> tuple[int, float] | None:
    finite = [p for p in points if math.isfinite(p[1])]
    if not finite or any(fnmatch.fnmatchcase(metric, pat) for pat in BOOKKEEPING):
        return None
    pick = min if lower_is_better(metric) else max
    return pick(finite, key=lambda p: p[1])  # ties: the earliest step


def format_table(runs, histories, experiment_names: dict, all_params: bool = False) -> str:
    rows: list[tuple[str, list[str]]] = [("", [r.info.run_name or "-" for r in runs])]
    rows.append(("run id", [r.info.run_id[:8] for r in runs]))
    if len({r.info.experiment_id for r in runs}) > 1:
        rows.append(("experiment", [experiment_names[r.info.experiment_id] for r in runs]))
    rows.append(("status", [r.info.status for r in runs]))
    rows.append(("started", [_clock(r.info.start_time) for r in runs]))
    rows.append(("duration", [_duration(r.info) for r in runs]))
    user_tags = sorted({k for r in runs for k in r.data.tags if not k.startswith("mlflow.")})
    rows += [(f"tag {k}", [r.data.tags.get(k, "-") for r in runs]) for k in user_tags]

    keys = sorted({k for r in runs for k in r.data.params})
    differ, same = [], 0
    for key in keys:
        values = [r.data.params.get(key, "-") for r in runs]
        if all(v == (r.info.run_name or "") for v, r in zip(values, runs)):
            continue  # the run name logged as a param (trainer.logger.run_name): in the header
        if len(set(values)) > 1 or all_params:
            differ.append((key, values))
        else:
            same += 1
    if all_params:
        title = f"params ({len(differ)})"
    elif len(runs) == 1:
        title = f"params: a single run, nothing to compare ({same} params)"
    else:
        title = f"params that differ ({same} identical not shown: --all-params)"
    sections = [(None, rows), (title, differ)]

    metric_rows = []
    for key in sorted({k for h in histories.values() for k in h}):
        series = [histories[r.info.run_id].get(key, []) for r in runs]
        metric_rows.append((key, [_point(s[-1]) if s else "-" for s in series]))
        bests = [best(s, key) for s in series]
        found = [b[1] for b in bests if b is not None]
        if found:
            top = (min if lower_is_better(key) else max)(found)
            cells = [
                "-" if b is None else _point(b) + (" *" if b[1] == top and len(runs) > 1 else "")
                for b in bests
            ]
            metric_rows.append(("  min" if lower_is_better(key) else "  max", cells))
    sections.append(("metrics: last value @ step, then the best (see --help)", metric_rows))

    width = max(len(label) for _, section in sections for label, _ in section)
    cols = [
        min(CELL, max(len(cells[i]) for _, s in sections for _, cells in s))
        for i in range(len(runs))
    ]
    lines = []
    for title, section in sections:
        if title is not None:
            lines += ["", title]
        for label, cells in section:
            text = "  ".join(_fit(c, w) for c, w in zip(cells, cols))
            lines.append(f"{label:<{width}}  {text}".rstrip())
    return "\n".join(lines)


def _point(point: tuple[int, float]) -> str:
    return f"{point[1]:.4g} @{point[0]}"


def _fit(text: str, width: int) -> str:
    return (text if len(text) <= width else text[: width - 1] + "~").ljust(width)


def _clock(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    s = max(0.0, (end - info.start_time) / 1000)
    text = f"{s:.1f}s" if s < 60 else f"{s // 60:.0f}m{s % 60:02.0f}s"
    if s >= 3600:
        text = f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"
    return text if info.end_time else f"{text} so far"


def choose_metrics(histories: dict, patterns: Sequence[str] | None) -> list[str]:
    logged = sorted({k for h in histories.values() for k, points in h.items() if points})
    if not patterns:
        return [m for m in DEFAULT_CURVES if m in logged]
    chosen = []
    for pattern in patterns:
        hits = [m for m in logged if fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            raise ConfigError(
                f"no metric {pattern!r} in these runs; they logged: {', '.join(logged) or 'none'}"
            )
        chosen += [m for m in hits if m not in chosen]
    return chosen


def plot(runs, histories, metrics: list[str], out: Path) -> tuple[int, int]:
    """Write one panel per metric; returns the image size in pixels (width, height)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    ncols = 1 if len(metrics) == 1 else 2 if len(metrics) <= 4 else 3
    nrows = math.ceil(len(metrics) / ncols)
    width, height = ncols * PANEL_PX[0], nrows * PANEL_PX[1]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in zip(axes, metrics):
        for run, colour in zip(runs, colours):
            points = histories[run.info.run_id].get(metric, [])
            if points:
                steps, values = zip(*points)
                marker = "o" if len(points) <= 30 else None
                label = f"{run.info.run_name} ({run.info.run_id[:8]})"
                ax.plot(steps, values, color=colour, marker=marker, markersize=3, label=label)
        better = "lower" if lower_is_better(metric) else "higher"
        ax.set_title(f"{metric} ({better} is better)", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.savefig(out, dpi=DPI)
    return width, height


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
