"""Start-up time of the CLI, the part of the interface a user feels on every command.

    python benchmarks/startup.py [--repeats 3]

Targets (issue: foundation): `python -m lit_grpo --help` under 3 s without importing
Lightning; `python -m lit_grpo fit --help` at most 1.3x a bare `import lightning.pytorch.cli`.
Prints the median wall time of each command over the repeats.
"""

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import lightning.pytorch.cli'": [
        sys.executable,
        "-c",
        "import lightning.pytorch.cli",
    ],
    "python -m lit_grpo --help": [sys.executable, "-m", "lit_grpo", "--help"],
    "python -m lit_grpo fit --help": [sys.executable, "-m", "lit_grpo", "fit", "--help"],
    "python -m lit_grpo fit --config configs/sft.yaml --print_config": [
        sys.executable,
        "-m",
        "lit_grpo",
        "fit",
        "--config",
        "configs/sft.yaml",
        "--print_config",
    ],
}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    wall(COMMANDS["python -c 'import lightning.pytorch.cli'"])  # warm the file cache
    times = {
        name: statistics.median(wall(cmd) for _ in range(args.repeats))
        for name, cmd in COMMANDS.items()
    }
    base = times["python -c 'import lightning.pytorch.cli'"]
    print(f"{'command':<66} {'median s':>9} {'vs lightning':>12}")
    print("-" * 89)
    for name, t in times.items():
        print(f"{name:<66} {t:9.2f} {t / base:11.2f}x")
    help_ok = times["python -m lit_grpo --help"] < 3.0
    fit_ok = times["python -m lit_grpo fit --help"] <= 1.3 * base
    print(
        f"\n--help under 3 s: {'yes' if help_ok else 'NO'}; "
        f"fit --help within 1.3x of import lightning.pytorch.cli: {'yes' if fit_ok else 'NO'}"
    )
    return 0 if help_ok and fit_ok else 1


if __name__ == "__main__":
    sys.exit(main())
