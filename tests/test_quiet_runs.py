"""A normal run of every command prints what the user can act on, and nothing else: no
Python or Lightning warning, none of the known noise (issue 21 item 7).

`every_command.py` runs them all in one process (one Lightning import, ~25 s in all on two
cores) and keeps each command's stdout and stderr."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_user_errors import NOISE

ROOT = Path(__file__).resolve().parent.parent
# what each command says when it worked
DONE = {
    "fit-sft": "`max_steps=4` reached",
    "validate": "val/loss",
    "test": "Talk2Move table",
    "export": "wrote TinyEditPolicy",
    "edit": "wrote   edit.png",
    "expand": "wrote 12 samples",
    "fit-grpo": "`max_steps=2` reached",
    "compare": "experiment  shapeworld-sft",
}
WARNING = re.compile(r"\.py:\d+: ")  # how Python and Lightning print a warning


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict[str, tuple[int, str]]:
    folder = tmp_path_factory.mktemp("every_command")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, not the editable install's
    script = ROOT / "tests/every_command.py"
    run = subprocess.run(
        [sys.executable, str(script), "out"], cwd=folder, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    codes = json.loads((folder / "out/exit_codes.json").read_text())
    return {name: (code, (folder / f"out/{name}.txt").read_text()) for name, code in codes.items()}


@pytest.mark.parametrize("command", DONE)
def test_a_normal_run_prints_no_warning(printed, command):
    code, text = printed[command]
    assert code == 0 and DONE[command] in text, text[-3000:]
    assert WARNING.findall(text) == [] and "Traceback" not in text, text[-3000:]
    assert [n for n in NOISE if n in text] == [], text[-3000:]


def test_an_sft_fit_shows_its_progress_bar_without_epoch_minus_two(printed):
    _, text = printed["fit-sft"]
    assert re.search(r"Epoch 0 +━", text), text[-2000:]  # the rich bar, drawn


def test_the_rich_progress_bar_names_the_epoch_alone_on_a_max_steps_run():
    from types import SimpleNamespace

    from lit_grpo.callbacks import RichProgressBar

    bar = RichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # max_steps alone: Lightning sets -1
    assert bar._get_train_description(0) == "Epoch 0   "  # padded to "Validation"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1) == "Epoch 1/2 "  # Lightning's own


def test_actionable_warnings_stay():
    """WeightAveraging's memory warning under ModelParallelStrategy (where our stages shard)
    and ModelCheckpoint's "dirpath has changed" when a fit resumes into another folder."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy

    from lit_grpo.callbacks import ModelCheckpoint
    from lit_grpo.cli import quiet_trainer

    memory = (
        "You're using the WeightAveraging callback with a model that overrides the "
        "configure_model callback. WeightAveraging doesn't support sharding model layers, so "
        "you may run out of memory."
    )
    for strategy, shown in ((ModelParallelStrategy(), [memory]), (SingleDeviceStrategy(), [])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(SimpleNamespace(strategy=strategy, callbacks=[]))
            warnings.warn(memory, UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == shown
    state = {"dirpath": "runs/1/old/checkpoints", "best_model_path": "b.ckpt"}
    state |= {"best_model_score": None}
    with pytest.warns(UserWarning, match="The dirpath has changed from 'runs/1/old/checkpoints'"):
        ModelCheckpoint(dirpath="runs/1/new/checkpoints").load_state_dict(state)  # in a fit
