"""Editing policies behind one contract (`EditPolicy`): the embedded tiny editor, and the
diffusers backbones."""

from lit_grpo.policies.base import Condition, EditPolicy
from lit_grpo.policies.flux_kontext import FluxKontextPolicy
from lit_grpo.policies.lora import LoraSettings
from lit_grpo.policies.qwen_edit import QwenImageEditPolicy
from lit_grpo.policies.tiny import TinyEditPolicy
from lit_grpo.policies.weights import load_policy_weights, save_policy_weights

__all__ = [
    "Condition",
    "EditPolicy",
    "FluxKontextPolicy",
    "LoraSettings",
    "QwenImageEditPolicy",
    "TinyEditPolicy",
    "load_policy_weights",
    "save_policy_weights",
]
