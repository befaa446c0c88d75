"""docs/callbacks.md's example, run exactly as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "callbacks.md"


def test_early_exit_example_from_the_docs_runs_and_picks_the_peak(capsys):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    scope: dict = {"__name__": "docs_example"}
    exec(compile(code, str(DOC), "exec"), scope)
    selector = scope["selector"]
    assert selector.exit_step == 3 and scope["model"].exit_step == 3
    assert [h["step"] for h in selector.history] == [0, 4]
    assert "exit step: 3 probes: [0, 4]" in capsys.readouterr().out
