"""lit_grpo: Lightning training for RL post-training of flow-matching image editors.

The package root imports nothing heavy, so `python -m lit_grpo --help` stays fast; import
the layers you need (`lit_grpo.modules`, `lit_grpo.policies`, ...) directly.
"""

__version__ = "0.1.0"
