"""The layers of docs/architecture.md, checked: each subpackage imports only the floors below
it (lazy imports inside functions count; imports for type checking only do not)."""

import ast
from pathlib import Path

import lit_grpo

ROOT = Path(lit_grpo.__file__).parent

# layer -> the lit_grpo layers it may import (besides itself); docs/architecture.md's table
ALLOWED = {
    "sampling": {"checks"},  # ConfigError: the rollout memory refusal
    "datamodules": {"checks"},  # ConfigError: bad rows end without a traceback
    "checks": set(),
    "perception": {"datamodules", "checks"},  # ShapeWorld's palette, lazily; ConfigError
    "policies": {"sampling", "checks", "datamodules"},  # ShapeWorld's words, lazily
    "rewards": {"perception", "checks", "__version__"},  # one-line errors; the wire's version
    "metrics": {"perception"},
    "loggers": {"checks"},
    "callbacks": {"loggers"},  # log_image, lazily: any Lightning logger
    "modules": {"policies", "sampling", "perception", "rewards", "metrics", "loggers", "checks"},
    # expand: the instruction templates; serve-rewards: the rewards and their segmenter
    "commands": {"checks", "policies", "datamodules", "rewards", "perception"},
    "cli": {"checks", "metrics", "policies", "callbacks", "loggers"},
    "__main__": {"checks", "cli", "commands", "callbacks", "__version__"},
    "__init__": set(),
}


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


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from lit_grpo.modules import GRPOModule\n")
    assert imported_layers(bad) == {"modules"}
