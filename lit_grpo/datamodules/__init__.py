"""Data: ShapeWorld, the embedded procedural world, and jsonl datasets of real images.

The data modules are resolved lazily so that `lit_grpo.datamodules.shapeworld` and
`.instructions` (numpy and torch only) can be imported without pulling in Lightning.
"""

__all__ = ["JsonlDataModule", "ShapeWorldDataModule"]


def __getattr__(name: str):
    if name == "ShapeWorldDataModule":
        from lit_grpo.datamodules.shapeworld_dm import ShapeWorldDataModule

        return ShapeWorldDataModule
    if name == "JsonlDataModule":
        from lit_grpo.datamodules.jsonl import JsonlDataModule

        return JsonlDataModule
    raise AttributeError(f"module 'lit_grpo.datamodules' has no attribute {name!r}")
