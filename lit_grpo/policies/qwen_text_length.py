"""A host sync inside diffusers' `QwenImageTransformer2DModel.forward`, and the context that
leaves it out of our calls.

diffusers 0.42's forward starts with `compute_text_seq_len_from_mask`, which returns the
text's sequence length, each row's text length and the mask as booleans. On the way to the
per-row lengths it builds a device tensor from a Python int (`torch.as_tensor(text_seq_len,
device=...)`): a blocking host-to-device copy, the host waiting for the GPU's queue to
drain, once per transformer call. The forward throws those lengths away
(`text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(...)`).

`no_text_length_sync()` puts, for the duration of one call, a function in its place that
returns the same sequence length and boolean mask and no per-row lengths: the same
forward, without the copy. Ours, written because diffusers offers no switch for it (a
fix belongs upstream); it is used only where the installed forward is seen to discard the
lengths, so a diffusers release that reads them runs its own function unchanged.
"""

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor

# how diffusers 0.42's forward calls it, discarding the per-row lengths
DISCARDS_LENGTHS = "text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask("

_swap = threading.Lock()  # one swap at a time; a second caller finds the function swapped


def text_length_and_mask(
    encoder_hidden_states: Tensor, encoder_hidden_states_mask: Tensor | None
) -> tuple[int, None, Tensor | None]:
    """What `compute_text_seq_len_from_mask` returns that the forward reads: the sequence
    length (the text's token count) and the mask as booleans; None for the per-row lengths."""
    batch_size, text_seq_len = encoder_hidden_states.shape[:2]
    if encoder_hidden_states_mask is None:
        return text_seq_len, None, None
    if encoder_hidden_states_mask.shape[:2] != (batch_size, text_seq_len):
        raise ValueError(
            f"`encoder_hidden_states_mask` shape {encoder_hidden_states_mask.shape} must "
            f"match (batch_size, text_seq_len)=({batch_size}, {text_seq_len})."
        )
    return text_seq_len, None, encoder_hidden_states_mask.to(torch.bool)


@cache
def _module():
    """diffusers' transformer module when its forward discards the per-row lengths, else
    None."""
    from diffusers.models.transformers import transformer_qwenimage as module

    try:
        source = inspect.getsource(module.QwenImageTransformer2DModel.forward)
    except (OSError, TypeError):  # no source to read: leave diffusers as it is
        return None
    if DISCARDS_LENGTHS not in source or not hasattr(module, "compute_text_seq_len_from_mask"):
        return None
    return module


@contextmanager
def no_text_length_sync() -> Iterator[bool]:
    """Within: the transformer's forward without the per-row text lengths it discards (see
    module docstring). Yields whether the swap is in place."""
    module = _module()
    if module is None or not _swap.acquire(blocking=False):
        yield False
        return
    original = module.compute_text_seq_len_from_mask
    module.compute_text_seq_len_from_mask = text_length_and_mask
    try:
        yield True
    finally:
        module.compute_text_seq_len_from_mask = original
        _swap.release()
