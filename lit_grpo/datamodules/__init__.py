"""Data: ShapeWorld, the embedded procedural world (and, later, jsonl datasets of real images).

`ShapeWorldDataModule` is resolved lazily so that `lit_grpo.datamodules.shapeworld` (numpy
and torch only) can be imported without pulling in Lightning.
"""

__all__ = ["ShapeWorldDataModule"]


def __getattr__(name: str):
    if name == "ShapeWorldDataModule":
        from lit_grpo.datamodules.shapeworld_dm import ShapeWorldDataModule

        return ShapeWorldDataModule
    raise AttributeError(f"module 'lit_grpo.datamodules' has no attribute {name!r}")
