"""A word-level tokenizer and a small text encoder for the embedded editor.

Why our own: ShapeWorld instructions come from a closed set of templates, so a word
vocabulary covers them exactly, costs nothing to load, and keeps CPU training fast. Real
backbones use their own encoders (T5, CLIP, Qwen-VL) through diffusers.
"""

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_grpo.sampling.flow import host_to_device

PAD, UNK = 0, 1
_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")


class WordTokenizer:
    """Lower-cases, splits into words and numbers, maps unknown words to UNK."""

    def __init__(self, vocabulary: Sequence[str], max_words: int = 16):
        self.vocabulary = list(dict.fromkeys(w.lower() for w in vocabulary))
        self.index = {w: i + 2 for i, w in enumerate(self.vocabulary)}
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.vocabulary) + 2

    def __call__(self, texts: Sequence[str], device=None) -> tuple[Tensor, Tensor]:
        """texts -> ids [N, max_words] (int64), mask [N, max_words] (True on real words)."""
        ids = torch.full((len(texts), self.max_words), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            for col, word in enumerate(_WORD.findall(text.lower())[: self.max_words]):
                ids[row, col] = self.index.get(word, UNK)
        ids = ids if device is None else host_to_device(ids, device)  # no host sync
        mask = ids != PAD
        mask[:, 0] = True  # an empty instruction still has one key to attend to
        return ids, mask

    def phrase_mask(self, texts: Sequence[str], phrases: Sequence[str]) -> Tensor:
        """[N, max_words] bool: the word positions of the first occurrence of each phrase in
        its text (all False where it does not occur within max_words)."""
        if len(texts) != len(phrases):
            raise ValueError(f"{len(texts)} texts but {len(phrases)} phrases")
        out = torch.zeros(len(texts), self.max_words, dtype=torch.bool)
        for row, (text, phrase) in enumerate(zip(texts, phrases)):
            words = _WORD.findall(text.lower())[: self.max_words]
            target = _WORD.findall(phrase.lower())
            k = len(target)
            for start in range(len(words) - k + 1) if k else ():
                if words[start : start + k] == target:
                    out[row, start : start + k] = True
                    break
        return out


class TextEncoder(nn.Module):
    """Word embeddings, learned positions and `layers` transformer encoder layers."""

    def __init__(
        self, vocab_size: int, width: int, layers: int = 1, heads: int = 4, max_words: int = 16
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.position = nn.Parameter(torch.zeros(1, max_words, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.embed(ids) + self.position[:, : ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        return self.norm(h)  # [N, L, width]
