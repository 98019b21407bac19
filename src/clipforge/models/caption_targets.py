"""What a caption's token ids say about its words, for the predictive objectives and their zero-shot scorers.

Ids as ``tokenize`` gives them: [SOT], tokens, [EOS] (the largest id), zero padding. [SOT], [EOS] and
padding are not words.
"""

from __future__ import annotations

import torch
from torch import Tensor


def caption_lengths(ids: Tensor) -> Tensor:
    """Tokens from [SOT] to [EOS] inclusive, per caption ([EOS] has the largest id)."""
    return ids.argmax(dim=-1) + 1


def word_mask(ids: Tensor) -> Tensor:
    """True at each caption's words: after [SOT], before [EOS]."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions > 0) & (positions < (caption_lengths(ids) - 1)[:, None])


def bag_of_words_target(ids: Tensor, vocab_size: int) -> Tensor:
    """[N, vocab_size] float32: each caption's word counts over its number of words (a caption without
    words, e.g. an empty one, gets an all-zero row and so contributes no loss)."""
    mask = word_mask(ids)
    counts = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    counts.scatter_add_(1, ids.long(), mask.float())
    return counts / mask.sum(dim=1, keepdim=True).clamp(min=1)
