"""Tokenizer throughput on Flickr8k captions: clipforge vs OpenAI, Hugging Face and open_clip.

Every tokenizer turns the same captions into [N, 77] ids, in one process, repetitions interleaved
(the order rotates each repetition). The headline is **cold**: a new instance (empty caches) per
repetition; its construction is timed apart (``build_s``) and is not in the cold figure. **Warm** is
the same instance on the same captions again (every tokenizer here caches). Each run records the
1-minute load average before it and the process CPU time it used (``time.process_time``: more than
the wall time means several threads, as HF's Rust backend uses).

Agreement: the fraction of rows whose ids equal OpenAI's ``clip.tokenize`` (HF pads with [EOS], so
its ids are compared up to the first [EOS]); checked on the cold and the warm output of the first
repetition.

Corpora: the first 5,000 caption rows of ``flickr8k/captions.tsv`` (the headline) and all 40,455.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HEADLINE_CAPTIONS = 5000
NAMES = ("clipforge", "OpenAI clip.tokenize", "HF CLIPTokenizerFast", "HF tokenizers backend (Rust)", "open_clip")


@dataclass
class Impl:
    """How to build one tokenizer (timed as construction), run it (timed), and read its ids (not timed)."""

    make: Callable[[], Any]
    run: Callable[[Any, list[str]], Any]
    ids: Callable[[Any], np.ndarray]  # output -> int64 [N, 77] with OpenAI's zero padding


def _torch_ids(out: Any) -> np.ndarray:
    return out.numpy().astype(np.int64)


def _clipforge() -> Impl:
    from clipforge.tokenizer import Tokenizer

    return Impl(Tokenizer, lambda tok, texts: tok.tokenize(texts, truncate=True), _torch_ids)


def _openai() -> Impl:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
        import clip.clip as clip_module
    from clip.simple_tokenizer import SimpleTokenizer

    def run(tok: Any, texts: list[str]) -> Any:
        clip_module._tokenizer = tok  # clip.tokenize reads this module global
        return clip.tokenize(texts, truncate=True)

    return Impl(SimpleTokenizer, run, _torch_ids)


def _hf_zero_padded(ids: np.ndarray) -> np.ndarray:
    from clipforge.tokenizer import EOT_TOKEN_ID

    ids = np.asarray(ids, dtype=np.int64)
    eot = ids == EOT_TOKEN_ID
    return np.where(np.cumsum(eot, axis=1) - eot > 0, 0, ids)  # HF pads with [EOS], OpenAI with 0


def _hf_folder(folder: Path) -> Path:
    """CLIP's vocabulary as Hugging Face files (vocab.json, merges.txt, configs, tokenizer.json)."""
    import transformers

    from clipforge.tokenizer import get_tokenizer
    from clipforge.tokenizer.hf_files import save_hf_tokenizer_files

    if not (folder / "tokenizer.json").is_file():
        transformers.utils.logging.set_verbosity_error()
        save_hf_tokenizer_files(get_tokenizer(), folder)
        cls = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)  # v5: one (fast) class
        cls.from_pretrained(str(folder)).backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _huggingface(folder: Path) -> Impl:
    import transformers

    _hf_folder(folder)
    cls = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)

    def run(hf: Any, texts: list[str]) -> Any:
        return hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]

    return Impl(lambda: cls.from_pretrained(str(folder)), run, _hf_zero_padded)


def _hf_backend(folder: Path) -> Impl:
    """The Rust ``tokenizers`` pipeline behind CLIPTokenizerFast, without transformers' Python layer."""
    from tokenizers import Tokenizer as RustTokenizer

    _hf_folder(folder)

    def make() -> Any:
        backend = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        backend.enable_truncation(max_length=77)
        backend.enable_padding(length=77, pad_id=0, pad_token="!")  # OpenAI's zero padding
        return backend

    def ids(encodings: Any) -> np.ndarray:
        return _hf_zero_padded(np.array([e.ids for e in encodings], dtype=np.int64))

    return Impl(make, lambda backend, texts: backend.encode_batch(texts), ids)


def _open_clip() -> Impl:
    from open_clip.tokenizer import SimpleTokenizer

    return Impl(SimpleTokenizer, lambda tok, texts: tok(texts), _torch_ids)


def load_impls(folder: Path) -> tuple[dict[str, Impl], list[str]]:
    """The tokenizers that import here, and 'name: reason' for those that do not."""
    factories: dict[str, Callable[[], Impl]] = {
        "clipforge": _clipforge, "OpenAI clip.tokenize": _openai,
        "HF CLIPTokenizerFast": lambda: _huggingface(folder / "hf"),
        "HF tokenizers backend (Rust)": lambda: _hf_backend(folder / "hf"),
        "open_clip": _open_clip,
    }
    impls, skipped = {}, []
    for name, factory in factories.items():
        try:
            impls[name] = factory()
        except ImportError as error:
            skipped.append(f"{name}: {error}")
    return impls, skipped


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _median(values: list[float]) -> float:
    return float(np.median(values))


def measure(impls: dict[str, Impl], texts: list[str], reps: int) -> dict[str, dict[str, Any]]:
    """Per tokenizer: construction, cold and warm seconds (wall and CPU) per repetition, load, agreement."""
    for impl in impls.values():  # imports, lazy module state, allocator: not part of any figure
        impl.run(impl.make(), texts[:200])
    names = list(impls)
    runs: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in ("build_s", "cold_s", "warm_s", "build_cpu_s", "cold_cpu_s", "warm_cpu_s", "load")} for name in names}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            impl, record = impls[name], runs[name]
            gc.collect()
            load = _load()
            c0, t0 = time.process_time(), time.perf_counter()
            tok = impl.make()
            c1, t1 = time.process_time(), time.perf_counter()
            cold = impl.run(tok, texts)
            c2, t2 = time.process_time(), time.perf_counter()
            warm = impl.run(tok, texts)
            c3, t3 = time.process_time(), time.perf_counter()
            for key, value in (("build_s", t1 - t0), ("cold_s", t2 - t1), ("warm_s", t3 - t2),
                               ("build_cpu_s", c1 - c0), ("cold_cpu_s", c2 - c1), ("warm_cpu_s", c3 - c2),
                               ("load", load)):
                if value is not None:
                    record[key].append(value)
            if rep == 0:
                outputs[name] = (impl.ids(cold), impl.ids(warm))
            del tok, cold, warm
    reference = outputs.get("OpenAI clip.tokenize", (None, None))[0]
    n = len(texts)
    results = {}
    for name in names:
        record = runs[name]
        cold_ids, warm_ids = outputs[name]
        agree = None
        if reference is not None:
            same = (cold_ids == reference).all(axis=1) & (warm_ids == reference).all(axis=1)
            agree = float(same.mean())
        results[name] = {
            "captions": n, "reps": reps,
            "build_s": _median(record["build_s"]), "cold_s": _median(record["cold_s"]),
            "warm_s": _median(record["warm_s"]),
            "cold_captions_per_s": n / _median(record["cold_s"]), "warm_captions_per_s": n / _median(record["warm_s"]),
            "cold_cpu_s": _median(record["cold_cpu_s"]), "warm_cpu_s": _median(record["warm_cpu_s"]),
            "load_min": min(record["load"], default=None), "load_max": max(record["load"], default=None),
            "same_ids_as_openai": agree, "runs": record,
        }
    for name, r in results.items():
        for other, key in (("OpenAI clip.tokenize", "vs_openai"), ("HF CLIPTokenizerFast", "vs_hf_fast"),
                           ("HF tokenizers backend (Rust)", "vs_hf_backend")):
            if other in results:
                r[f"cold_{key}"] = r["cold_captions_per_s"] / results[other]["cold_captions_per_s"]
                r[f"warm_{key}"] = r["warm_captions_per_s"] / results[other]["warm_captions_per_s"]
    return results


def corpora(captions: list[str]) -> list[list[str]]:
    """The headline corpus (the first 5,000 captions), then every caption given, when there are more."""
    if len(captions) > HEADLINE_CAPTIONS:
        return [captions[:HEADLINE_CAPTIONS], captions]
    return [captions]


def run_all(captions: list[str], reps: int) -> tuple[dict[int, dict[str, dict[str, Any]]], list[str]]:
    """``measure`` on each corpus; {corpus size: {tokenizer: figures}} and the tokenizers skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        impls, skipped = load_impls(Path(tmp))
        return {len(texts): measure(impls, texts, reps) for texts in corpora(captions)}, skipped


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One corpus: a row per tokenizer, construction apart, cold (headline) and warm side by side."""
    lines = ["| tokenizer | construction ms | cold captions/s | cold CPU s | warm captions/s | warm CPU s | "
             "cold x OpenAI | cold x HF fast | cold x HF Rust | warm x OpenAI | same ids as OpenAI | load 1-min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in results.items():
        same = "" if r["same_ids_as_openai"] is None else f"{r['same_ids_as_openai']:.0%} rows"
        load = "" if r["load_min"] is None else f"{r['load_min']:.2f}-{r['load_max']:.2f}"
        lines.append(
            f"| {name} | {1e3 * r['build_s']:.1f} | {r['cold_captions_per_s']:,.0f} | {r['cold_cpu_s']:.3f} | "
            f"{r['warm_captions_per_s']:,.0f} | {r['warm_cpu_s']:.3f} | {_ratio(r.get('cold_vs_openai'))} | "
            f"{_ratio(r.get('cold_vs_hf_fast'))} | {_ratio(r.get('cold_vs_hf_backend'))} | "
            f"{_ratio(r.get('warm_vs_openai'))} | {same} | {load} |")
    return "\n".join(lines)


def tokenizer_rows(captions: list[str], reps: int, warmup: int) -> list[Any]:
    """The suite's rows: cold then warm captions/s per tokenizer, the 5,000-caption corpus first."""
    from clipforge.bench.common import Row

    del warmup  # measure() warms every tokenizer up once on 200 captions (imports, lazy state)
    by_size, _ = run_all(captions, reps)
    rows = []
    for size, results in by_size.items():
        for name, r in results.items():
            for kind in ("cold", "warm"):
                load = "" if r["load_min"] is None else f"; load {r['load_min']:.2f}-{r['load_max']:.2f}"
                fields = {"cpu_seconds": r["runs"][f"{kind}_cpu_s"],
                          "load": float(np.mean(r["runs"]["load"])) if r["runs"]["load"] else None}
                fields = {k: v for k, v in fields.items() if k in Row.__dataclass_fields__}
                rows.append(Row(section="tokenizer", model=f"{size} Flickr8k captions", precision=kind, impl=name,
                                value=size / _median(r["runs"][f"{kind}_s"]), unit="captions/s",
                                seconds=r["runs"][f"{kind}_s"], agree_ref=r["same_ids_as_openai"],
                                note=(f"construction {1e3 * r['build_s']:.1f} ms (not in the figure); "
                                      f"CPU {r[f'{kind}_cpu_s']:.3f} s per run{load}"), **fields))
    return rows
