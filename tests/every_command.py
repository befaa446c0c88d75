"""Run every command of `python -m lit_grpo` once, on tiny settings, in one process, and keep
what each printed: `python tests/every_command.py OUT_DIR` (in an empty working directory).

Each command's stdout and stderr (the file descriptors, so Lightning's and MLflow's log
handlers are caught too) go to `OUT_DIR/<name>.txt`; `OUT_DIR/exit_codes.json` maps each
name to its exit code. One process for all (a Lightning import alone takes ~10 s on two
cores), so a warning raised at import would be seen by the first command only; Python's
"shown once" memory of warnings is cleared before each command.
"""

import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_cli import GRPO_TINY, TINY  # noqa: E402

from lit_grpo.__main__ import main  # noqa: E402

SFT, GRPO = str(ROOT / "configs/sft.yaml"), str(ROOT / "configs/talk2move.yaml")
# the progress bars a user sees: TINY's turned back on, GRPO_TINY's left on
SFT_SHOWN = [*TINY, "--trainer.enable_progress_bar=true"]
GRPO_SHOWN = [a for a in GRPO_TINY if not a.startswith("--trainer.enable_progress_bar")]


def run(out: Path, name: str, *argv: str) -> int:
    warnings.filterwarnings("default", append=True)  # a no-op filter: clears "shown once"
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out / f"{name}.txt", "wb") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse and LightningCLI exit this way
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    return code


def every_command(out: Path) -> dict[str, int]:
    from PIL import Image

    from lit_grpo.datamodules.shapeworld import ShapeWorld

    codes = {"fit-sft": run(out, "fit-sft", "fit", "--config", SFT, *SFT_SHOWN)}
    (last,) = Path("runs").rglob("last.ckpt")
    for command in ("validate", "test"):
        codes[command] = run(out, command, command, "--config", SFT, *TINY, f"--ckpt_path={last}")
    codes["export"] = run(out, "export", "export", str(last), "editor.safetensors")
    source = ShapeWorld("test", 1, 16, ("translate",), seed=0)[0]
    pixels = (source["source"] * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save("source.png")
    edit = ["edit", "--ckpt", "editor.safetensors", "--image", "source.png", "--out", "edit.png"]
    codes["edit"] = run(out, "edit", *edit, "--instruction", source["instruction"], "--steps=2")
    Path("objects.jsonl").write_text(json.dumps({"image": "source.png", "object": "x"}) + "\n")
    expand = ["expand", "--annotations", "objects.jsonl", "--out", "samples.jsonl"]
    codes["expand"] = run(out, "expand", *expand)
    codes["fit-grpo"] = run(out, "fit-grpo", "fit", "--config", GRPO, *GRPO_SHOWN)
    codes["compare"] = run(out, "compare", "compare", "--experiment", "shapeworld-sft")
    return codes


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    sys.argv[1:] = []  # LightningCLI warns when given both args and command-line arguments
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exit_codes.json").write_text(json.dumps(every_command(folder)))
