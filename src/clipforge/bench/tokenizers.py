"""Tokenizer throughput on Flickr8k captions (folded in from bench/tokenizer_speed.py).

Every tokenizer turns the same captions into [N, 77] ids. "warm" reuses an instance that has
seen the captions (every tokenizer here caches); "cold" builds a new instance per repetition
(construction not timed). Agreement: the fraction of rows whose ids equal OpenAI's
``clip.tokenize`` (HF pads with [EOS], so its ids are compared up to the first [EOS]).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.bench.common import Row, median
from clipforge.tokenizer import EOT_TOKEN_ID, Tokenizer, get_tokenizer

Factory = tuple[Callable[[], Any], Callable[[Any, list[str]], torch.Tensor]]


def _clipforge() -> Factory:
    return Tokenizer, lambda tok, texts: tok.tokenize(texts, truncate=True)


def _openai() -> Factory:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
        import clip.clip as clip_module
    from clip.simple_tokenizer import SimpleTokenizer

    def run(tok: Any, texts: list[str]) -> torch.Tensor:
        clip_module._tokenizer = tok  # clip.tokenize reads this module global
        return clip.tokenize(texts, truncate=True)

    return SimpleTokenizer, run


def _huggingface(folder: Path) -> Factory:
    import transformers

    from clipforge.tokenizer.hf_files import save_hf_tokenizer_files

    transformers.utils.logging.set_verbosity_error()
    save_hf_tokenizer_files(get_tokenizer(), folder)
    cls = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)  # v5: one (fast) class

    def run(hf: Any, texts: list[str]) -> torch.Tensor:
        ids = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        after_eot = (ids == EOT_TOKEN_ID).int().cumsum(dim=1) - (ids == EOT_TOKEN_ID).int() > 0
        return ids.masked_fill(after_eot, 0)  # HF pads with [EOS], OpenAI with 0

    return lambda: cls.from_pretrained(str(folder)), run


def _hf_backend(folder: Path) -> Factory:
    """The Rust ``tokenizers`` pipeline behind CLIPTokenizerFast, without transformers' Python layer."""
    make_hf, _ = _huggingface(folder)

    def make() -> Any:
        backend = make_hf().backend_tokenizer
        backend.enable_truncation(max_length=77)
        backend.enable_padding(length=77, pad_id=0, pad_token="!")
        return backend

    def run(backend: Any, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.array([e.ids for e in backend.encode_batch(texts)], dtype=np.int32))

    return make, run


def _open_clip() -> Factory:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer, lambda tok, texts: tok(texts)


def tokenizer_rows(captions: list[str], reps: int, warmup: int) -> list[Row]:
    """Captions/s of each tokenizer, warm and cold, interleaved repetition by repetition."""
    import time

    with tempfile.TemporaryDirectory() as tmp:
        factories: dict[str, Callable[[], Factory]] = {
            "clipforge": _clipforge, "OpenAI clip.tokenize": _openai,
            "HF CLIPTokenizerFast": lambda: _huggingface(Path(tmp) / "hf"),
            "HF tokenizers backend (Rust)": lambda: _hf_backend(Path(tmp) / "hf2"),
            "open_clip": _open_clip,
        }
        loaded: dict[str, Factory] = {}
        skipped: list[str] = []
        for name, factory in factories.items():
            try:
                loaded[name] = factory()
            except ImportError as error:
                skipped.append(f"{name}: {error}")
        warm = {name: make() for name, (make, _) in loaded.items()}
        outputs = {}
        for name, (_, run) in loaded.items():
            for _ in range(max(1, warmup)):
                outputs[name] = run(warm[name], captions)
        times: dict[str, dict[str, list[float]]] = {name: {"warm": [], "cold": []} for name in loaded}
        names = list(loaded)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                make, run = loaded[name]
                fresh = make()
                start = time.perf_counter()
                run(fresh, captions)
                middle = time.perf_counter()
                run(warm[name], captions)
                times[name]["cold"].append(middle - start)
                times[name]["warm"].append(time.perf_counter() - middle)
    reference = outputs.get("OpenAI clip.tokenize")
    rows = []
    for name in loaded:
        same = None
        if reference is not None:
            same = float((outputs[name].long() == reference.long()).all(dim=1).float().mean())
        for kind in ("warm", "cold"):
            rows.append(Row(section="tokenizer", model=f"{len(captions)} Flickr8k captions", precision=kind,
                            impl=name, value=len(captions) / median(times[name][kind]), unit="captions/s",
                            seconds=times[name][kind], agree_ref=same,
                            note="agreement = fraction of rows equal to OpenAI's ids"))
    return rows
