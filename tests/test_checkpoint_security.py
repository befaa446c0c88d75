"""A checkpoint is data, never code: every path that reads one (`fit` / `validate` / `test
--ckpt_path`, a policy's `weights:`, `edit --ckpt`, `export`) fetches a URL to a local file and
reads it with `weights_only=True` (issue 21, item 1).

A booby-trapped pickle is served over 127.0.0.1; if anything unpickled it, the pickle would
create a marker file. Each command must refuse it in one line and leave no marker."""

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lit_grpo.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
SFT, GRPO = str(ROOT / "configs/sft.yaml"), str(ROOT / "configs/talk2move.yaml")


class Trap:
    """Unpickling this creates `marker` (what a hostile `os.system(...)` would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def served(in_tmp, monkeypatch):
    """(folder served over http://127.0.0.1, its base URL, the marker file); the server
    stops with the test. Downloads go to a cache inside the test's folder."""
    folder = in_tmp / "www"
    folder.mkdir()
    monkeypatch.setenv("LIT_GRPO_CACHE", str(in_tmp / "cache"))
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", in_tmp / "PWNED"
    finally:
        server.shutdown()
        server.server_close()


def booby_trap(path: Path, marker: Path) -> Path:
    """A file that looks like a GRPO checkpoint and runs code when unpickled."""
    torch.save(
        {
            "hyper_parameters": {"_class_path": "lit_grpo.modules.GRPOModule"},
            "state_dict": {},
            "lit_grpo_policy": {"class": "TinyEditPolicy", "config": {}, "payload": Trap(marker)},
        },
        path,
    )
    return path


def refusal(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_booby_trapped_checkpoint_runs_nothing_on_any_path(served, capsys):
    folder, url, marker = served
    trap = booby_trap(folder / "evil.ckpt", marker)
    remote, local = f"{url}/evil.ckpt", trap.as_uri()  # http:// and file://
    for ckpt in (remote, local):
        for command, config in (("fit", GRPO), ("validate", GRPO), ("test", GRPO)):
            line = refusal(capsys, command, "--config", config, f"--ckpt_path={ckpt}")
            assert "is not a readable checkpoint" in line, line
            assert "weights_only=False" not in line
            assert ckpt in line or trap.name in line  # the URL the user gave, or the file
        line = refusal(
            capsys,
            "fit",
            "--config",
            GRPO,
            f"--model.init_args.policy.init_args.weights={ckpt}",
        )
        assert "is not a readable checkpoint" in line, line
        from PIL import Image

        Image.new("RGB", (32, 32)).save("in.png")
        edit = ["edit", "--ckpt", ckpt, "--image", "in.png", "--instruction", "x", "--out", "o.png"]
        line = refusal(capsys, *edit)
        assert "is not a readable checkpoint" in line, line
        for extra in ([], ["--lora-diffusers"]):
            line = refusal(capsys, "export", ckpt, "out.safetensors", *extra)
            assert "is not a readable checkpoint" in line, line
    assert not marker.exists(), "a checkpoint was unpickled: its code ran"
    # Lightning's own load, behind the CLI's checks, refuses it too
    from lit_grpo.callbacks.checkpoint import AtomicCheckpointIO

    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(trap)
    assert not marker.exists()


def test_weights_only_false_is_refused(in_tmp, capsys):
    line = refusal(capsys, "fit", "--config", SFT, "--weights_only=false")
    assert "lit_grpo never unpickles a checkpoint" in line


def test_remote_checkpoints_and_weights_are_fetched_and_used(served, capsys):
    """What a URL is for: a real checkpoint served over http validates and exports like the
    local file; an unreachable URL is one line naming it."""
    from test_cli import TINY

    from lit_grpo.cli import run_cli

    folder, url, _ = served
    run_cli(["fit", "--config", SFT, *TINY, "--trainer.max_steps=2"])
    (last,) = Path("runs").rglob("last.ckpt")
    (folder / "last.ckpt").write_bytes(last.read_bytes())
    cli = run_cli(["validate", "--config", SFT, *TINY, f"--ckpt_path={url}/last.ckpt"])
    assert "val/loss" in cli.trainer.callback_metrics
    assert main(["export", f"{url}/last.ckpt", "remote.safetensors"]) == 0
    assert main(["export", str(last), "local.safetensors"]) == 0
    from safetensors.torch import load_file

    remote, local = load_file("remote.safetensors"), load_file("local.safetensors")
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[k], local[k]) for k in local)
    line = refusal(capsys, "export", f"{url}/missing.ckpt", "x.safetensors")
    assert f"{url}/missing.ckpt could not be fetched (HTTPError" in line


def test_a_weights_file_builds_only_lit_grpos_policies(monkeypatch):
    """`load_policy` resolves the class a weights file names among lit_grpo's policies
    only: any other name of the policies package (a function, a settings class) or a path
    outside it is refused."""
    import lit_grpo.policies.weights as w
    from lit_grpo.policies import TinyEditPolicy

    assert w.policy_class("TinyEditPolicy") is TinyEditPolicy
    assert w.policy_class("lit_grpo.policies.tiny.TinyEditPolicy") is TinyEditPolicy
    for name in ("LoraSettings", "load_policy_weights", "EditPolicy", "os.system", None):
        assert w.policy_class(name) is None, name
    assert w.policy_class("evil.module.TinyEditPolicy") is None
    monkeypatch.setattr(w, "read_policy_file", lambda weights: ({}, {}, "LoraSettings"))
    with pytest.raises(w.IncompatibleWeightsError, match="unknown policy class 'LoraSettings'"):
        w.load_policy("anything.safetensors")
