"""Each model's tokenizer, giving exactly the ids of open_clip 3.3.0's ``get_tokenizer``.

Most models use CLIP's BPE (``CLIPTokenizer``); a config whose text tower names a Hugging Face
tokenizer (``hf_tokenizer_name``: CLIPA's BERT, mT5, XLM-V, ...) gets ``HFTokenizer``, which needs
the optional ``transformers`` package. Both truncate long texts like open_clip (the last slot holds
the end token) and return int64 ids. Built tokenizers are cached, so ``model.tokenize`` per batch
costs a dict lookup plus the tokenization itself.

open_clip's BPE differs from OpenAI's ``clip.tokenize`` (``clipforge.tokenize``) in two ways kept
here: its special tokens are spelt ``<start_of_text>``/``<end_of_text>`` (so a literal
``<|endoftext|>`` in a caption is ordinary text), and it always truncates instead of raising.
"""

from __future__ import annotations

import html
import os
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex

from clipforge.errors import TokenizerError
from clipforge.tokenizer.bpe import (
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    _BoundedCache,
    is_fast_text,
)
from clipforge.tokenizer.rows import encode_rows, pack_rows

__all__ = ["CLEAN_MODES", "CLIPTokenizer", "HFTokenizer", "get_tokenizer"]

DEFAULT_CONTEXT_LENGTH = 77
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
OPEN_CLIP_SOT, OPEN_CLIP_EOT = "<start_of_text>", "<end_of_text>"
# open_clip's pretokenizer: OpenAI's, with open_clip's spelling of the two special tokens.
_PRETOKEN_PAT = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL_IDS = {OPEN_CLIP_SOT: (SOT_TOKEN_ID,), OPEN_CLIP_EOT: (EOT_TOKEN_ID,)}  # exact case only, as open_clip
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_CHUNK_CACHE_SIZE = 1 << 18


def _basic_clean(text: str) -> str:
    """open_clip's ``basic_clean``; ftfy and html.unescape are the identity on printable ASCII without '&'."""
    if is_fast_text(text):
        return text.strip()
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean(text: str, mode: str) -> str:
    """open_clip's ``get_clean_fn(mode)(text)``, statement for statement."""
    text = _basic_clean(text)
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
        return " ".join(text.split()).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


def _check_context_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TokenizerError(f"context_length must be a positive integer, got {value!r}.")
    return value


def _as_list(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenizers expect str texts, got {type(text).__name__} at index {index}.")
    return texts


class CLIPTokenizer:
    """open_clip's ``SimpleTokenizer``: CLIP BPE ids, always truncated with EOT last, int64.

    BPE merges come from clipforge's shared fast ``Tokenizer`` (its per-pretoken cache); this class
    adds open_clip's cleaning modes, special-token spelling and a per-chunk cache of packed ids.
    """

    vocab_size = VOCAB_SIZE
    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower",
                 reduction_mask: str | None = None) -> None:
        if reduction_mask:
            raise TokenizerError(f"reduction_mask={reduction_mask!r} (open_clip's training-time token dropping) is "
                                 "not supported; tokenize with plain truncation by leaving reduction_mask out.")
        if clean not in CLEAN_MODES:
            raise TokenizerError(f"clean={clean!r} is not a cleaning mode; use one of {', '.join(CLEAN_MODES)}.")
        from clipforge.tokenizer import get_tokenizer as shared_bpe

        self.context_length = _check_context_length(context_length)
        self.clean = clean
        self.bpe = shared_bpe()
        self.decoder = {**self.bpe.decoder, SOT_TOKEN_ID: OPEN_CLIP_SOT, EOT_TOKEN_ID: OPEN_CLIP_EOT}
        self._lookup = _chunk_bytes(self.bpe)

    def _rows(self, texts: list[str]) -> list[bytes]:
        """Packed int32 ids of each text (no SOT/EOT): cleaned text split on ' ', ids per chunk (exact,
        since pretokens never contain ' '). basic_clean is the identity on printable ASCII without '&',
        so there a text is just split (and lower-cased in mode "lower"); canonicalize always cleans."""
        if self.clean == "canonicalize":
            join, mode = b"".join, self.clean
            return [join(map(self._lookup, clean(text, mode).split(" "))) for text in texts]
        return encode_rows(self._lookup, texts, lambda text: clean(text, self.clean), lower=self.clean == "lower")

    def _ids(self, text: str) -> bytes:
        return self._rows([text])[0]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOT/EOT, as open_clip's ``SimpleTokenizer.encode``."""
        return np.frombuffer(self._ids(text), dtype=np.int32).tolist()

    def decode(self, ids: Any) -> str:
        """open_clip's ``SimpleTokenizer.decode``: every id rendered, specials as ``<start_of_text>``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids
        text = "".join([self.decoder[int(i)] for i in ids])
        data = bytearray([self.bpe.byte_decoder[c] for c in text])
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Any:
        """Int64 ids [N, context_length]: SOT, ids, EOT, zeros; a long text keeps its first ids and ends in EOT."""
        import torch  # only here: ``numpy`` serves torch-free runtimes (ONNX)

        return torch.from_numpy(self.numpy(texts, context_length))

    def numpy(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """``__call__`` as an int64 numpy array, without importing torch."""
        texts = _as_list(texts)
        context_length = self.context_length if context_length is None else _check_context_length(context_length)
        # open_clip: tokens[:context_length], then tokens[-1] = EOT, i.e. pack_rows' truncation.
        return pack_rows(self._rows(texts), texts, context_length, np.int64, truncate=True)

    def __repr__(self) -> str:
        return f"CLIPTokenizer(context_length={self.context_length}, clean={self.clean!r})"


@lru_cache(maxsize=4)
def _chunk_bytes(bpe: Any) -> Any:
    """A bounded cache: chunk of cleaned text -> its ids as packed int32 (shared by all clean modes).

    An all-ASCII-letters chunk is one pretoken under open_clip's pattern too, so it takes the shared
    tokenizer's regex-free path (whole-word lookup, else BPE); other chunks are pretokenized here.
    """

    def compute(chunk: str) -> bytes:
        if chunk.isalpha() and chunk.isascii():
            return bpe._chunk_bytes(chunk)
        ids = [i for tok in _PRETOKEN_PAT.findall(chunk) for i in (_SPECIAL_IDS.get(tok) or bpe.bpe(tok))]
        return np.array(ids, dtype=np.int32).tobytes()

    return _BoundedCache(compute, _CHUNK_CACHE_SIZE).__getitem__


class HFTokenizer:
    """open_clip's ``HFTokenizer`` (standard mode): clean, then pad/truncate to the context length."""

    def __init__(self, name_or_folder: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 clean: str = "whitespace", strip_sep_token: bool = False, language: str | None = None,
                 tokenizer_mode: str | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        name = str(name_or_folder)
        if tokenizer_mode:
            raise TokenizerError(f"tokenizer_mode={tokenizer_mode!r} is not supported for the tokenizer '{name}'; "
                                 "only open_clip's standard mode (tokenizer_mode None) is.")
        if clean not in CLEAN_MODES:
            raise TokenizerError(f"clean={clean!r} is not a cleaning mode; use one of {', '.join(CLEAN_MODES)}.")
        self.name = name
        self.context_length = _check_context_length(context_length)
        self.clean = clean
        self.strip_sep_token = bool(strip_sep_token)
        self.tokenizer = _load_hf_tokenizer(name, cache_dir)
        self.vocab_size = len(self.tokenizer)
        if language is not None:
            set_language = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
            if not callable(set_language):
                raise TokenizerError(f"the tokenizer '{name}' has no source-language setting; leave language out.")
            set_language(language)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Any:
        """Int64 ids [N, context_length] from the Hugging Face tokenizer, padded to the full length."""
        import torch

        return torch.from_numpy(self.numpy(texts, context_length))

    def numpy(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """``__call__`` as an int64 numpy array (the tokenizer's own numpy output; no torch)."""
        texts = [clean(text, self.clean) for text in _as_list(texts)]
        context_length = self.context_length if context_length is None else _check_context_length(context_length)
        ids = np.asarray(self.tokenizer(texts, return_tensors="np", max_length=context_length, padding="max_length",
                                        truncation=True).input_ids, dtype=np.int64)
        sep = self.tokenizer.sep_token_id
        if self.strip_sep_token and sep is not None:  # CLIPA: [SEP] becomes padding
            ids = np.where(ids == sep, 0, ids)
        return ids

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(folder)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name!r}, context_length={self.context_length}, clean={self.clean!r}, "
                f"strip_sep_token={self.strip_sep_token})")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _load_hf_tokenizer(name: str, cache_dir: str | os.PathLike | None) -> Any:
    """``AutoTokenizer.from_pretrained``, with missing package/files turned into one-sentence errors."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"the tokenizer '{name}' needs the transformers package; install it with "
                             "`pip install transformers`.") from None
    folder = Path(name).expanduser()
    if _looks_like_path(name) and not folder.is_dir():
        raise TokenizerError(f"tokenizer folder '{name}' does not exist; pass a folder containing the tokenizer "
                             "files (tokenizer.json or vocab files).")
    source = str(folder) if folder.is_dir() else name
    try:
        return AutoTokenizer.from_pretrained(source, cache_dir=None if cache_dir is None else str(cache_dir))
    except (OSError, ValueError, KeyError) as error:
        if folder.is_dir():
            raise TokenizerError(f"tokenizer folder '{name}' holds no loadable tokenizer files "
                                 f"({type(error).__name__}); pass a folder written by save_pretrained.") from None
        raise TokenizerError(f"the Hugging Face tokenizer '{name}' is not cached and cannot be downloaded; connect "
                             "to the internet once so it is cached, or pass a folder containing the tokenizer "
                             "files.") from None


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a kwargs value (dicts and lists become sorted/plain tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


_CLIP_OPTIONS = ("clean", "reduction_mask")
_HF_OPTIONS = ("clean", "strip_sep_token", "language", "tokenizer_mode")


@lru_cache(maxsize=32)
def _build(hf_name: str | None, context_length: int, options: tuple, cache_dir: str | None) -> Any:
    kwargs = {key: value for key, value in options}
    allowed = _HF_OPTIONS if hf_name else _CLIP_OPTIONS
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        which = f"the Hugging Face tokenizer '{hf_name}'" if hf_name else "the CLIP BPE tokenizer"
        raise TokenizerError(f"tokenizer option '{unknown[0]}' is not supported by {which}; "
                             f"use only {', '.join(allowed)}.")
    if hf_name:
        return HFTokenizer(hf_name, context_length, cache_dir=cache_dir, **kwargs)
    return CLIPTokenizer(context_length, **kwargs)


def get_tokenizer(source: Any = None, context_length: int | None = None,
                  cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> CLIPTokenizer | HFTokenizer:
    """The tokenizer open_clip's ``get_tokenizer`` gives for a model, built once and cached.

    ``source``: None (CLIP BPE, 77 tokens), an architecture name or config file, a ``ModelConfig``,
    or a model (anything with a ``.config`` ModelConfig). ``context_length`` overrides the config's;
    ``kwargs`` override its ``tokenizer_kwargs`` (``clean``, ``strip_sep_token``, ...).
    """
    from clipforge.models import get_model_config
    from clipforge.models.config import ModelConfig

    if source is None:
        hf_name, default_length, options = None, DEFAULT_CONTEXT_LENGTH, {}
    else:
        if isinstance(source, (str, os.PathLike)):
            config = get_model_config(source)
        elif isinstance(source, ModelConfig):
            config = source
        elif isinstance(getattr(source, "config", None), ModelConfig):
            config = source.config
        else:
            raise TokenizerError(f"cannot find a tokenizer for a {type(source).__name__}; pass a model name, "
                                 "a ModelConfig or a clipforge model.")
        if config.text is None:
            raise TokenizerError(f"model '{config.name}' has no text tower, so it has no tokenizer; tokenize with "
                                 "a model that has one.")
        hf_name, default_length = config.text.hf_tokenizer_name, config.text.context_length
        options = dict(config.text.tokenizer_kwargs)
    options.update(kwargs)
    length = default_length if context_length is None else _check_context_length(context_length)
    try:
        key = _freeze(options)
        hash(key)
    except TypeError:
        raise TokenizerError(f"tokenizer options must be plain values, got {options!r}.") from None
    return _build(hf_name, length, key, None if cache_dir is None else str(cache_dir))
