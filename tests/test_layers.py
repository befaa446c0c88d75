"""The layers of docs/architecture.md, checked: each subpackage imports only the floors below
it (lazy imports inside functions count; imports for type checking only do not)."""

import ast
import re
from pathlib import Path

import lit_grpo

ROOT = Path(lit_grpo.__file__).parent

DOC = ROOT.parent / "docs" / "architecture.md"


def documented_layers() -> dict[str, set[str]]:
    """layer -> the lit_grpo layers it may import (besides itself), read from the layer table
    of docs/architecture.md (`| layer | holds | imports |`): the layer names in its imports
    column. The package's `__init__` imports nothing of its own."""
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in DOC.read_text().splitlines()]
    table = [r for r in rows if len(r) == 3 and r[0].strip().startswith("`")]
    names = {r[0].strip().strip("`").removesuffix("/").removesuffix(".py"): r[2] for r in table}
    known = set(names) | {"__version__"}
    return {
        layer: set(re.findall(r"[A-Za-z_]+", imports)) & known - {layer}
        for layer, imports in names.items()
    } | {"__init__": set()}


ALLOWED = documented_layers()


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are annotations, not imports
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "lit_grpo":
                names = [f"lit_grpo.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lit_grpo" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_every_layer_imports_only_the_floors_below_it():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = layer_of(path)
        assert layer in ALLOWED, f"{path}: layer {layer!r} missing from the table"
        extra = imported_layers(path) - ALLOWED[layer] - {layer}
        wrong += [f"{path.relative_to(ROOT)} imports lit_grpo.{e}" for e in sorted(extra)]
    assert not wrong, "\n".join(wrong)


def test_the_table_names_every_layer():
    assert {"sampling", "objectives", "modules", "cli", "checks", "__main__"} <= set(ALLOWED)
    assert ALLOWED["objectives"] == {"sampling"}
    assert "modules" not in ALLOWED["objectives"] and "objectives" in ALLOWED["modules"]


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from lit_grpo.modules import GRPOModule\n")
    assert imported_layers(bad) == {"modules"}
