"""CLIP's byte-level BPE tokenizer: the same ids as OpenAI's ``clip.tokenize``, much faster.

The ids are part of every CLIP checkpoint's definition, so exactness comes first. Speed comes from
(1) skipping ftfy/html for printable-ASCII text without ``&`` (both are the identity there),
(2) caching ids per ' '-separated chunk of cleaned text, so a known word costs one dict hit at
C speed, and (3) building the output from packed int32 bytes with one numpy assignment.

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT, github.com/openai/CLIP),
copied unchanged from the clip-anytorch package.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex

from clipforge.errors import TokenizerError

DEFAULT_BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # OpenAI uses the first 48894 merges of the file
DEFAULT_CACHE_SIZE = 1 << 18  # entries per cache; a full cache is cleared (bounded memory)

# OpenAI's pretokenizer, applied (like OpenAI) to cleaned, lower-cased text.
_PRETOKEN_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_SOT_BYTES = np.array([SOT_TOKEN_ID], dtype=np.int32).tobytes()
_EOT_BYTES = np.array([EOT_TOKEN_ID], dtype=np.int32).tobytes()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so BPE works on str free of whitespace/controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """OpenAI's normalisation: ftfy, html-unescape twice, strip, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def is_fast_text(text: str) -> bool:
    """True when ftfy.fix_text and html.unescape are the identity on ``text`` (tested)."""
    return text.isascii() and text.isprintable() and "&" not in text


def split_chunks(text: str) -> list[str]:
    """Cleaned, lower-cased ``text`` split on ' ' (empty strings possible, they encode to nothing).

    Pretokenising a text equals pretokenising each ' '-separated chunk, since no pretoken can
    contain ' '; this is what makes the per-chunk cache exact.
    """
    if is_fast_text(text):
        return text.lower().split()  # printable ASCII: ' ' is the only whitespace
    return clean_text(text).split(" ")


class _BoundedCache(dict):
    """dict that computes a missing value with ``compute`` and empties itself when full."""

    def __init__(self, compute: Callable[[str], Any], max_size: int) -> None:
        super().__init__()
        self.compute = compute
        self.max_size = max_size

    def __missing__(self, key: str) -> Any:
        value = self.compute(key)
        if len(self) >= self.max_size:
            self.clear()
        self[key] = value
        return value


class Tokenizer:
    """CLIP BPE tokenizer with OpenAI ``SimpleTokenizer`` semantics plus caches.

    ``encode``/``decode`` match OpenAI's; ``tokenize`` builds the padded [N, context_length] ids.
    Caches: ``cache`` maps a pretoken to its id tuple; a second one maps a chunk to packed int32.
    """

    vocab_size = VOCAB_SIZE
    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID

    def __init__(self, bpe_path: str | Path | None = None, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        if len(self.encoder) != VOCAB_SIZE or self.encoder[EOT_TOKEN] != EOT_TOKEN_ID:
            raise TokenizerError(f"BPE file {path} does not define CLIP's {VOCAB_SIZE}-token vocabulary.")
        self.bpe_ranks: dict[tuple[str, ...], int] = {m: r for r, m in enumerate(merges)}
        self._byte_chars = [self.byte_encoder[b] for b in range(256)]
        # str.translate + latin-1 = OpenAI's per-character byte_decoder lookup, at C speed.
        self._to_bytes = {ord(c): b for c, b in self.byte_decoder.items()}
        self._specials = {SOT_TOKEN: (SOT_TOKEN_ID,), EOT_TOKEN: (EOT_TOKEN_ID,)}
        self.cache: dict[str, tuple[int, ...]] = _BoundedCache(self._pretoken_ids, cache_size)
        self._chunk_cache: dict[str, bytes] = _BoundedCache(self._chunk_bytes, cache_size)

    # -- encoding -------------------------------------------------------------------------------

    def bpe(self, pretoken: str) -> tuple[int, ...]:
        """Ids of one pretoken (a regex match in cleaned text), cached."""
        return self.cache[pretoken]

    def _pretoken_ids(self, pretoken: str) -> tuple[int, ...]:
        special = self._specials.get(pretoken)
        return special if special is not None else self._merge(pretoken)

    def _merge(self, pretoken: str) -> tuple[int, ...]:
        """Greedy BPE: merge every occurrence (left to right) of the lowest-ranked pair, repeat."""
        chars = self._byte_chars
        word = [chars[b] for b in pretoken.encode("utf-8")]
        word[-1] += "</w>"
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank, best = NUM_MERGES, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged, out, i, n = first + second, [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        encoder = self.encoder
        return tuple(encoder[s] for s in word)

    def _chunk_bytes(self, chunk: str) -> bytes:
        cache = self.cache
        ids = [i for tok in _PRETOKEN_PAT.findall(chunk) for i in cache[tok]]
        return np.array(ids, dtype=np.int32).tobytes()

    def _encode_bytes(self, text: str) -> bytes:
        return b"".join(map(self._chunk_cache.__getitem__, split_chunks(text)))

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOT/EOT, like OpenAI's ``SimpleTokenizer.encode``."""
        return np.frombuffer(self._encode_bytes(text), dtype=np.int32).tolist()

    def tokenize(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> Any:
        """Int32 tensor [N, context_length]: SOT, ids, EOT, zero padding, as OpenAI's ``clip.tokenize``."""
        import torch  # only here: the numpy path below serves torch-free runtimes (ONNX)

        return torch.from_numpy(self.tokenize_numpy(texts, context_length, truncate))

    def tokenize_numpy(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> np.ndarray:
        """``tokenize`` as an int32 numpy array, without importing torch."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise TokenizerError(f"context_length must be at least 1, got {context_length}.")
        buf = bytearray()  # all rows' ids back to back, packed int32
        lengths: list[int] = []
        lookup = self._chunk_cache.__getitem__
        max_bytes = 4 * context_length
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenize expects str texts, got {type(text).__name__} at index {index}.")
            if text.isascii() and text.isprintable() and "&" not in text:  # inlined split_chunks
                chunks = text.lower().split()
            else:
                chunks = clean_text(text).split(" ")
            row = b"".join(map(lookup, chunks))
            size = len(row) + 8  # with SOT and EOT
            if size > max_bytes:
                if not truncate:
                    raise TokenizerError(f"Input {text} is too long for context length {context_length}")
                row, size = (_SOT_BYTES + row)[: max_bytes - 4], max_bytes  # EOT forced into the last slot
                buf += row
            else:
                buf += _SOT_BYTES
                buf += row
            buf += _EOT_BYTES
            lengths.append(size)
        out = np.zeros((len(texts), context_length), dtype=np.int32)
        filled = np.arange(0, max_bytes, 4) < np.array(lengths, dtype=np.int64)[:, None]  # byte sizes
        out[filled] = np.frombuffer(buf, dtype=np.int32)  # row-major order = concatenation order
        return out

    __call__ = tokenize

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, ids: Any) -> str:
        """OpenAI's ``SimpleTokenizer.decode``: every id is rendered (specials and 0 included)."""
        decoder = self.decoder
        text = "".join([decoder[i] for i in _as_int_list(ids)])
        return text.translate(self._to_bytes).encode("latin-1").decode("utf-8", errors="replace").replace("</w>", " ")

    def decode_row(self, ids: Any) -> str:
        """Decode one ``tokenize`` row: drop a leading SOT, the last EOT and the padding after it."""
        ids = _as_int_list(ids)
        if ids and ids[0] == SOT_TOKEN_ID:
            ids = ids[1:]
        if EOT_TOKEN_ID in ids:
            ids = ids[: len(ids) - 1 - ids[::-1].index(EOT_TOKEN_ID)]
        else:
            while ids and ids[-1] == 0:  # an encoded word never ends in id 0 ('!' without </w>)
                ids.pop()
        return self.decode(ids)


def _as_int_list(ids: Any) -> list[int]:
    """Accept an int, list, tuple, numpy array or tensor of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]
