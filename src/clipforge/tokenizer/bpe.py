"""CLIP's byte-level BPE tokenizer: the same ids as OpenAI's ``clip.tokenize``, much faster.

The ids are part of every CLIP checkpoint's definition, so exactness comes first. Speed comes from
(1) skipping ftfy/html for printable-ASCII text without ``&`` (both are the identity there),
(2) caching ids per ' '-separated chunk of cleaned text, so a known word costs one dict hit at
C speed, (3) a whole-word shortcut for new words: when ``word</w>`` is a vocabulary token, greedy BPE
ends in exactly that token (checked for every vocabulary entry, ``whole_word_exceptions``), so most
words cost one dict lookup instead of a merge loop, and an all-ASCII-letters chunk is one pretoken, so
the regex is skipped for it, (4) for the other words, a merge loop that ranks the pairs with C-level
``map`` once and then updates only a merge's neighbours, with each pair's rank computed on first use
from the vocabulary (merge ``r`` makes token ``512 + r``) instead of hashing all 48,894 merges,
(5) building the output from packed int32 bytes with one numpy assignment, and (6) cheap
construction: only the used prefix of the merge list is decompressed; OpenAI's ``bpe_ranks`` and the
decoder are built on first access.

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT, github.com/openai/CLIP),
copied unchanged from the clip-anytorch package.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import sys
import zlib
from array import array
from collections.abc import Callable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex

from clipforge.errors import TokenizerError
from clipforge.tokenizer.rows import encode_rows, pack_rows

DEFAULT_BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # OpenAI uses the first 48894 merges of the file
DEFAULT_CACHE_SIZE = 1 << 18  # entries per cache; a full cache is cleared (bounded memory)
# sha256 of the used part of the default merge file (the header line and the first NUM_MERGES lines,
# '\n'-separated), and the vocabulary tokens ``w</w>`` whose BPE is not that one token: none for
# CLIP's vocabulary (tests/test_tokenizer.py recomputes both). Other merge files compute theirs.
DEFAULT_MERGES_SHA256 = "6e881f7ff9ad0a6b1eff3087dfc80d6a3531c8f2ad2e89ecbc357113970c815d"
DEFAULT_WHOLE_WORD_EXCEPTIONS: frozenset[str] = frozenset()
_NO_RANK = 1 << 30

# OpenAI's pretokenizer, applied (like OpenAI) to cleaned, lower-cased text.
_PRETOKEN_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_BYTEORDER = sys.byteorder  # packed ids are native int32, as np.frombuffer(..., np.int32) reads them


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


@lru_cache(maxsize=1)
def _byte_translation() -> dict[int, str]:
    """``str.translate`` table: latin-1 character ``chr(b)`` -> byte ``b``'s BPE character."""
    return dict(bytes_to_unicode())


def byte_encode(pretoken: str) -> str:
    """OpenAI's ``''.join(byte_encoder[b] for b in pretoken.encode('utf-8'))``, at C speed."""
    return pretoken.encode("utf-8").decode("latin-1").translate(_byte_translation())


def _read_merge_lines(path: Path) -> tuple[str, list[str], str]:
    """The header line plus the first NUM_MERGES lines of a gzip merge file ('\n'-joined), those
    lines, and the sha256 of that text's UTF-8 bytes.

    Only the needed prefix (~0.64 of 3.2 MB) is decompressed; '\r\n'/'\r' become '\n' as in text mode.
    """
    inflate = zlib.decompressobj(wbits=31)  # gzip container
    parts: list[bytes] = []
    newlines, read_all = 0, False
    try:
        with open(path, "rb") as f:
            while read_all or newlines <= NUM_MERGES:
                block = f.read(1 << 16)
                if not block or inflate.eof:
                    if inflate.eof and (inflate.unused_data or block):  # several gzip members
                        parts.append(gzip.decompress(inflate.unused_data + block + f.read()))
                    break
                part = inflate.decompress(block)
                parts.append(part)
                newlines += part.count(b"\n")
                read_all = read_all or b"\r" in part  # other line ends: decompress it all
    except (OSError, EOFError, zlib.error) as error:
        raise TokenizerError(f"cannot read the BPE merge file {path}: {error}") from None
    data = b"".join(parts)
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if newlines > NUM_MERGES:  # drop the cut tail (it may end inside a UTF-8 character)
        data = data[: data.rindex(b"\n")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenizerError(f"BPE file {path} is not UTF-8: {error}") from None
    lines = text.split("\n", NUM_MERGES + 1)  # header, the merges, then the unused rest
    if len(lines) > NUM_MERGES + 1:
        rest = lines.pop()
        text = text[: len(text) - len(rest) - 1]
        data = data[: len(data) - len(rest.encode("utf-8")) - 1]
    return text, lines[1:], hashlib.sha256(data).hexdigest()


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


class _PairRanks(dict):
    """"first second" -> merge rank, or ``_NO_RANK``; computed per pair on first use, not for all 48,894.

    Merge ``r``'s token ``first + second`` has id ``512 + r`` (the vocabulary has no duplicates), so a
    pair's rank is its joined token's id - 512, valid when merge line ``r`` is exactly that pair.
    """

    def __init__(self, encoder: dict[str, int], lines: list[str], max_size: int = 1 << 18) -> None:
        super().__init__()
        self.encoder, self.lines, self.max_size = encoder, lines, max_size

    def __missing__(self, pair: str) -> int:
        rank = self.encoder.get(pair.replace(" ", ""), 0) - 512
        if not (0 <= rank < len(self.lines) and self.lines[rank] == pair):
            rank = _NO_RANK
        if len(self) >= self.max_size:
            self.clear()
        self[pair] = rank
        return rank


class Tokenizer:
    """CLIP BPE tokenizer with OpenAI ``SimpleTokenizer`` semantics plus caches.

    ``encode``/``decode`` match OpenAI's; ``tokenize`` builds the padded [N, context_length] ids.
    Caches: ``cache`` maps a pretoken to its id tuple; a second one maps a chunk to packed int32.
    ``bpe_ranks`` (OpenAI's pair -> rank dict) and ``decoder`` are built on first access.
    """

    vocab_size = VOCAB_SIZE
    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID

    def __init__(self, bpe_path: str | Path | None = None, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        self.bpe_path = path
        text, lines, self._merges_sha256 = _read_merge_lines(path)
        if self._merges_sha256 != DEFAULT_MERGES_SHA256:  # another file: normalise to "a b" like OpenAI's split()
            lines = [" ".join(line.split()) for line in lines]
            text = "\n".join(["", *lines])
        self._merge_lines = lines  # "first second", in rank order
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._byte_chars = [self.byte_encoder[b] for b in range(256)]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += text.replace(" ", "").split("\n")[1:]  # each merge's token, "".join(pair)
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = dict(zip(vocab, range(len(vocab))))
        if len(self.encoder) != VOCAB_SIZE or self.encoder.get(EOT_TOKEN) != EOT_TOKEN_ID:
            raise TokenizerError(f"BPE file {path} does not define CLIP's {VOCAB_SIZE}-token vocabulary.")
        # str.translate + latin-1 = OpenAI's per-character byte_decoder lookup, at C speed.
        self._to_bytes = {ord(c): b for c, b in self.byte_decoder.items()}
        self._specials = {SOT_TOKEN: (SOT_TOKEN_ID,), EOT_TOKEN: (EOT_TOKEN_ID,)}
        self._exceptions = DEFAULT_WHOLE_WORD_EXCEPTIONS if self._merges_sha256 == DEFAULT_MERGES_SHA256 else None
        self.cache: dict[str, tuple[int, ...]] = _BoundedCache(self._pretoken_ids, cache_size)
        self._chunk_cache: dict[str, bytes] = _BoundedCache(self._chunk_bytes, cache_size)

    # -- lazily built tables --------------------------------------------------------------------

    @cached_property
    def bpe_ranks(self) -> dict[tuple[str, ...], int]:
        """OpenAI's ``bpe_ranks``: merge pair -> rank (built on first access; encoding does not need it)."""
        return {tuple(line.split()): rank for rank, line in enumerate(self._merge_lines)}

    @cached_property
    def _pair_ranks(self) -> dict[str, int]:
        """"first second" -> rank (``_NO_RANK`` if not a merge), filled on demand from the encoder."""
        return _PairRanks(self.encoder, self._merge_lines)

    @cached_property
    def decoder(self) -> dict[int, str]:
        return {i: tok for tok, i in self.encoder.items()}

    @property
    def whole_word_exceptions(self) -> frozenset[str]:
        """Vocabulary tokens ``w</w>`` whose BPE of ``w`` is not that single token (computed for other merge files)."""
        if self._exceptions is None:
            self._exceptions = compute_whole_word_exceptions(self)
        return self._exceptions

    # -- encoding -------------------------------------------------------------------------------

    def bpe(self, pretoken: str) -> tuple[int, ...]:
        """Ids of one pretoken (a regex match in cleaned text), cached."""
        return self.cache[pretoken]

    def _pretoken_ids(self, pretoken: str) -> tuple[int, ...]:
        special = self._specials.get(pretoken)
        if special is not None:
            return special
        word = byte_encode(pretoken)
        token = word + "</w>"
        token_id = self.encoder.get(token)
        if token_id is not None and token not in self.whole_word_exceptions:
            return (token_id,)  # whole-word shortcut: BPE of word ends in the one token word</w>
        return self._merge_word(word)

    def _merge(self, pretoken: str) -> tuple[int, ...]:
        """Plain greedy BPE of a pretoken (no shortcut, no cache)."""
        return self._merge_word(byte_encode(pretoken))

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """Greedy BPE of a byte-encoded word: merge every occurrence (left to right) of the lowest-ranked pair.

        ``pair_ranks[i]`` is the rank of (parts[i], parts[i + 1]); one merge updates only its neighbours.
        """
        parts = list(word)
        parts[-1] += "</w>"
        rank = self._pair_ranks.__getitem__
        pair_ranks = list(map(rank, map(" ".join, zip(parts, parts[1:]))))
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_RANK:
                break
            i = pair_ranks.index(best)
            if pair_ranks.count(best) == 1:  # one occurrence (a rank names one pair): merge in place
                merged = parts[i] + parts[i + 1]
                parts[i : i + 2] = [merged]
                if i + 1 < len(parts):  # a right neighbour
                    if i:
                        pair_ranks[i - 1 : i + 2] = [rank(parts[i - 1] + " " + merged), rank(merged + " " + parts[i + 1])]
                    else:
                        pair_ranks[0:2] = [rank(merged + " " + parts[1])]
                elif i:
                    pair_ranks[i - 1 : i + 1] = [rank(parts[i - 1] + " " + merged)]
                else:
                    break  # one part left
                continue
            first, second = parts[i], parts[i + 1]  # several occurrences: OpenAI's left-to-right scan
            merged, out, n = first + second, parts[:i], len(parts)
            while i < n:
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
            pair_ranks = list(map(rank, map(" ".join, zip(parts, parts[1:]))))
        return tuple(map(self.encoder.__getitem__, parts))

    def _chunk_bytes(self, chunk: str) -> bytes:
        if chunk.isalpha() and chunk.isascii():  # one [\p{L}]+ pretoken, its own byte encoding
            token = chunk + "</w>"
            token_id = self.encoder.get(token)
            if token_id is not None and token not in self.whole_word_exceptions:
                return token_id.to_bytes(4, _BYTEORDER)
            return array("i", self.cache[chunk]).tobytes()
        cache = self.cache
        return array("i", [i for tok in _PRETOKEN_PAT.findall(chunk) for i in cache[tok]]).tobytes()

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
        texts = [texts] if isinstance(texts, str) else list(texts)
        if context_length < 1:
            raise TokenizerError(f"context_length must be at least 1, got {context_length}.")
        rows = encode_rows(self._chunk_cache.__getitem__, texts, clean_text, lower=True)
        return pack_rows(rows, texts, context_length, np.int32, truncate=truncate)

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


def compute_whole_word_exceptions(tokenizer: Tokenizer) -> frozenset[str]:
    """Every vocabulary token ``w</w>`` for which the plain merge loop on ``w`` does not give that token."""
    encoder = tokenizer.encoder
    out = set()
    for token, token_id in encoder.items():
        if token.endswith("</w>") and len(token) > 4 and tokenizer._merge_word(token[:-4]) != (token_id,):
            out.add(token)
    return frozenset(out)
