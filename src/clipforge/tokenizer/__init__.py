"""CLIP's text tokenizer: OpenAI-exact ids, fast.

The default ``Tokenizer`` is built on first use (reading the used part of the merge list and
building the vocabulary takes ~0.03 s; the merge-rank table is filled only when a word needs
merging), so importing clipforge stays cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from clipforge.tokenizer.bpe import (
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    Tokenizer,
    bytes_to_unicode,
    clean_text,
)

vocab_size = VOCAB_SIZE

__all__ = [
    "EOT_TOKEN_ID",
    "SOT_TOKEN_ID",
    "Tokenizer",
    "bytes_to_unicode",
    "clean_text",
    "decode",
    "decode_batch",
    "get_tokenizer",
    "tokenize",
    "tokenize_numpy",
    "vocab_size",
]

_default: Tokenizer | None = None
_lock = threading.Lock()


def get_tokenizer() -> Tokenizer:
    """The shared default tokenizer, created on the first call."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = Tokenizer()
    return _default


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> Any:
    """Int32 ids [N, context_length], identical to OpenAI's ``clip.tokenize``.

    Raises ``TokenizerError`` (a RuntimeError, same message as OpenAI) when a text does not fit
    and ``truncate`` is False; with ``truncate`` the last kept slot becomes EOT.
    """
    return get_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def tokenize_numpy(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> Any:
    """``tokenize`` as an int32 numpy array; imports no torch (for the ONNX runtime path)."""
    return get_tokenizer().tokenize_numpy(texts, context_length=context_length, truncate=truncate)


def decode(ids: Any) -> str:
    """Text of one row of ids (list/array/tensor), without SOT, the final EOT and padding."""
    return get_tokenizer().decode_row(ids)


def decode_batch(ids: Any) -> list[str]:
    """``decode`` applied to each row of a 2-D tensor/array or list of id lists."""
    rows = ids.tolist() if hasattr(ids, "tolist") else ids
    tok = get_tokenizer()
    return [tok.decode_row(row) for row in rows]
