"""Captions/second of clipforge's tokenizer vs OpenAI, Hugging Face and open_clip on Flickr8k.

Cold = a new tokenizer instance per repetition (empty caches; construction not timed, reported
apart), warm = the same instance again. Each figure is the median of --reps timed runs. The
"same ids" column checks each output against OpenAI's ``clip.tokenize`` (HF has no ftfy/html
step, so it can only agree on plain text like these captions).

    python bench/tokenizer_speed.py --json out/tokenizer_speed.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TSV = ROOT.parent / "shared/data/flickr8k/captions.tsv"


def load_captions(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f, delimiter="\t")]


def _clipforge() -> tuple[Callable[[], Any], Callable[[Any, list[str]], torch.Tensor]]:
    from clipforge.tokenizer import Tokenizer

    return Tokenizer, lambda tok, texts: tok.tokenize(texts, truncate=True)


def _openai() -> tuple[Callable[[], Any], Callable[[Any, list[str]], torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
        import clip.clip as clip_module
    from clip.simple_tokenizer import SimpleTokenizer

    def run(tok: Any, texts: list[str]) -> torch.Tensor:
        clip_module._tokenizer = tok  # clip.tokenize reads this module global
        return clip.tokenize(texts, truncate=True)

    return SimpleTokenizer, run


def _huggingface(tmp: Path) -> tuple[Callable[[], Any], Callable[[Any, list[str]], torch.Tensor]]:
    import transformers

    from clipforge.tokenizer import EOT_TOKEN_ID, get_tokenizer
    from clipforge.tokenizer.hf_files import save_hf_tokenizer_files

    save_hf_tokenizer_files(get_tokenizer(), tmp)
    cls = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)  # v5: one fast class

    def make() -> Any:
        return cls.from_pretrained(str(tmp))  # a local folder: no network

    def run(hf: Any, texts: list[str]) -> torch.Tensor:
        ids = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        # HF pads with EOT; OpenAI pads with 0. Zero everything after the first EOT to compare.
        after_eot = (ids == EOT_TOKEN_ID).int().cumsum(dim=1) - (ids == EOT_TOKEN_ID).int() > 0
        return ids.masked_fill(after_eot, 0)

    return make, run


def _hf_backend(tmp: Path) -> tuple[Callable[[], Any], Callable[[Any, list[str]], torch.Tensor]]:
    """The Rust ``tokenizers`` pipeline behind CLIPTokenizerFast, without transformers' Python layer."""
    make_hf, _ = _huggingface(tmp)

    def make() -> Any:
        backend = make_hf().backend_tokenizer
        backend.enable_truncation(max_length=77)
        backend.enable_padding(length=77, pad_id=0, pad_token="!")  # OpenAI's zero padding
        return backend

    def run(backend: Any, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.array([e.ids for e in backend.encode_batch(texts)], dtype=np.int32))

    return make, run


def _open_clip() -> tuple[Callable[[], Any], Callable[[Any, list[str]], torch.Tensor]]:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer, lambda tok, texts: tok(texts)


def measure(make: Callable[[], Any], run: Callable[[Any, list[str]], torch.Tensor], texts: list[str],
            reps: int) -> dict[str, Any]:
    """Median seconds of a cold (new instance) and a warm (same instance) pass over ``texts``."""
    run(make(), texts[:100])  # warm-up: imports, lazy init, allocator
    build, cold, warm = [], [], []
    out = None
    for _ in range(reps):
        t0 = time.perf_counter()
        tok = make()
        t1 = time.perf_counter()
        out = run(tok, texts)
        t2 = time.perf_counter()
        run(tok, texts)
        t3 = time.perf_counter()
        build.append(t1 - t0)
        cold.append(t2 - t1)
        warm.append(t3 - t2)
    n = len(texts)
    return {
        "build_s": statistics.median(build),
        "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "cold_captions_per_s": n / statistics.median(cold),
        "warm_captions_per_s": n / statistics.median(warm),
        "output": out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=Path, default=DEFAULT_TSV, help="TSV with a 'caption' column")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per tokenizer (median)")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if not args.captions.exists():
        print(f"captions file not found: {args.captions}", file=sys.stderr)
        return 1
    texts = load_captions(args.captions)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        candidates = {
            "clipforge.tokenize": _clipforge,
            "OpenAI clip.tokenize": _openai,
            "HF CLIPTokenizerFast (transformers, batched)": lambda: _huggingface(Path(tmp)),
            "HF tokenizers backend encode_batch (Rust)": lambda: _hf_backend(Path(tmp)),
            "open_clip SimpleTokenizer": _open_clip,
        }
        for name, factory in candidates.items():
            try:
                make, run = factory()
            except ImportError as exc:
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            results[name] = measure(make, run, texts, args.reps)
    reference = results.get("OpenAI clip.tokenize")
    base = reference["warm_captions_per_s"] if reference else None
    print(f"\n{len(texts)} captions, median of {args.reps} runs, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}\n")
    print("| tokenizer | cold captions/s | warm captions/s | warm speed-up vs OpenAI | build s | same ids as OpenAI |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results.items():
        same = "n/a" if reference is None else str(torch.equal(r["output"].long(), reference["output"].long()))
        r["same_ids_as_openai"] = same
        speedup = f"{r['warm_captions_per_s'] / base:.1f}x" if base else "n/a"
        print(f"| {name} | {r['cold_captions_per_s']:,.0f} | {r['warm_captions_per_s']:,.0f} | {speedup} | "
              f"{r['build_s']:.3f} | {same} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "captions": len(texts),
            "reps": args.reps,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "results": {k: {f: v for f, v in r.items() if f != "output"} for k, r in results.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
