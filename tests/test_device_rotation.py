"""scripts/device_rotation.sh, issue 20's prepared GPU call, checked end to end on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_rotation_script_trains_exports_and_evaluates_on_cpu(tmp_path):
    """SMOKE=1: a few steps of two of its editors, their float16 weights, the eval table.
    About 2 minutes on 2 cores."""
    from lit_grpo.policies.weights import load_policy, read_policy_file

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env |= {"SMOKE": "1", "ACCELERATOR": "cpu", "WORKERS": "0", "NAMES": "base fine"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/device_rotation.sh")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "eval.txt").read_text()
    for name in ("base", "fine"):
        rows = [line.split() for line in table.splitlines() if f"{name}.safetensors" in line]
        assert [row[1] for row in rows] == ["translate", "rotate", "scale"]
        assert (tmp_path / f"fit-{name}.log").is_file()
        assert list((tmp_path / name).rglob("hparams.yaml"))  # the CSV logger's folder
    assert not (tmp_path / "wide.safetensors").exists()  # not in NAMES
    _, arch, _ = read_policy_file(str(tmp_path / "fine.safetensors"))
    assert (arch["patch_size"], arch["width"], arch["depth"]) == (2, 160, 6)
    load_policy(str(tmp_path / "fine.safetensors"))  # float16 on disk, loads as the editor


def test_device_rotation_script_says_what_to_do_without_a_gpu(tmp_path):
    # no GPU visible to torch, on any machine (on a GPU machine it would otherwise train)
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/device_rotation.sh")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no GPU that torch can use here" in done.stderr
    assert "SMOKE=1 ACCELERATOR=cpu" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing started
