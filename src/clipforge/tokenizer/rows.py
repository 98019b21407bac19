"""Texts to padded id rows, shared by OpenAI's tokenizer (``bpe.Tokenizer``) and open_clip's
(``factory.CLIPTokenizer``): clean and look up each ' '-chunk, then pack SOT, ids, EOT and zero
padding into one array with a single numpy assignment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from clipforge.errors import TokenizerError

SOT_TOKEN_ID, EOT_TOKEN_ID = 49406, 49407
_SOT_BYTES = np.array([SOT_TOKEN_ID], dtype=np.int32).tobytes()
_EOT_BYTES = np.array([EOT_TOKEN_ID], dtype=np.int32).tobytes()
_EOT_SOT_BYTES = _EOT_BYTES + _SOT_BYTES


def check_texts(texts: list[Any]) -> str:
    """All texts joined (one C pass); a TypeError naming the first non-str text like before."""
    try:
        return "".join(texts)
    except TypeError:
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenize expects str texts, got {type(text).__name__} at index {index}.") from None
        raise


def encode_rows(lookup: Callable[[str], bytes], texts: list[str], clean: Callable[[str], str],
                lower: bool) -> list[bytes]:
    """Packed int32 ids of each text (no SOT/EOT): ``lookup`` of each ' '-chunk of the cleaned text.

    ``clean`` is the full cleaning (ftfy, html, whitespace, case); on printable ASCII without '&' it
    equals ``str.split`` of the (lower-cased) text, done for a whole all-fast batch in a few C calls.
    """
    joined = check_texts(texts)
    join = b"".join
    if not texts:
        return []
    if joined.isascii() and joined.isprintable() and "&" not in joined:  # every text is fast
        if lower:
            texts = "\n".join(texts).lower().split("\n")  # printable: no '\n' inside a text
        return [join(map(lookup, text.split())) for text in texts]
    rows = []
    for text in texts:
        if text.isascii() and text.isprintable() and "&" not in text:
            chunks = (text.lower() if lower else text).split()
        else:
            chunks = clean(text).split(" ")
        rows.append(join(map(lookup, chunks)))
    return rows


def pack_rows(rows: list[bytes], texts: list[str], context_length: int, dtype: Any, truncate: bool) -> np.ndarray:
    """[N, context_length] ids: SOT, row, EOT, zeros. A long row raises OpenAI's error, or with
    ``truncate`` keeps its first context_length - 1 tokens (SOT included) and ends in EOT."""
    max_bytes = 4 * context_length
    out = np.zeros((len(rows), context_length), dtype=dtype)
    if not rows:
        return out
    lengths = list(map(len, rows))
    if max(lengths) + 8 <= max_bytes:
        buf = _SOT_BYTES + _EOT_SOT_BYTES.join(rows) + _EOT_BYTES
        sizes = np.array(lengths, dtype=np.int64) + 8
    else:
        pieces = []
        for text, row in zip(texts, rows):
            if len(row) + 8 > max_bytes:
                if not truncate:
                    raise TokenizerError(f"Input {text} is too long for context length {context_length}")
                pieces.append((_SOT_BYTES + row)[: max_bytes - 4] + _EOT_BYTES)  # EOT forced into the last slot
            else:
                pieces.append(_SOT_BYTES + row + _EOT_BYTES)
        buf = b"".join(pieces)
        sizes = np.minimum(np.array(lengths, dtype=np.int64) + 8, max_bytes)
    filled = np.arange(0, max_bytes, 4) < sizes[:, None]  # byte sizes
    out[filled] = np.frombuffer(buf, dtype=np.int32)  # row-major order = concatenation order
    return out
