"""Measure the collection path: embedding throughput (whole pipeline vs the model alone), search latency
and recall, index build time and memory. Prints markdown tables; slow, so it is a script, not a test.

    .venv/bin/python bench/collection_bench.py                      # everything (~15 min on 2 cores)
    .venv/bin/python bench/collection_bench.py --only search --sizes 100000 1000000
    .venv/bin/python bench/collection_bench.py --only embed --images ../shared/data/flickr8k/images

Embedding: ``embed_collection`` over every image of the folder (JPEG decoding and preprocessing in
worker processes) against ``model.for_inference`` on already-preprocessed batches of the same size —
the ceiling the pipeline can reach. Search: synthetic unit vectors in 512 dimensions, clustered so
approximate search is not trivially easy; exact search latency per single text-sized query (1 x 512);
faiss IVF-PQ recall@10 against exact search on held-out queries, its build time and its size.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_embed(images: Path, model_name: str, batch_size: int, workers: int, precision: str) -> None:
    import clipforge
    from clipforge.checkpoints import model_transform
    from clipforge.collection.embed import embed_collection
    from clipforge.collection.sources import open_source

    model = clipforge.create_model(model_name).eval()
    preprocess = model_transform(model.config)
    source = open_source(images)
    count = len(source)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fast = model.for_inference(dtype)
    batch = torch.randn(batch_size, 3, model.image_size, model.image_size)
    fast.encode_image(batch)  # warm-up
    steps = max(3, min(20, count // batch_size))
    start = time.perf_counter()
    for _ in range(steps):
        fast.encode_image(batch)
    model_only = steps * batch_size / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        info = embed_collection(source, Path(out) / "emb", model, preprocess, kind="img", batch_size=batch_size,
                                num_workers=workers, precision=precision, progress=False)
        seconds = time.perf_counter() - start
    embedded = int(info.counts.get("img", count))
    pipeline = embedded / seconds
    print(f"\n### Embedding {count:,} images of {images} ({model_name}, batch {batch_size}, {precision}, "
          f"{workers} decode workers, {torch.get_num_threads()} torch threads)\n")
    print("| what | images/s | share of model-only |")
    print("|---|---:|---:|")
    print(f"| model alone (`for_inference`, preprocessed batches) | {model_only:.1f} | 100% |")
    print(f"| whole pipeline (`clipforge embed`: decode + preprocess + model + write) | {pipeline:.1f} | "
          f"{100 * pipeline / model_only:.0f}% |")
    print(f"\nwall time of the pipeline: {seconds:.1f} s for {embedded:,} embedded images")


def _clustered(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, count // 1000), dim)).astype(np.float32)
    chunks = []
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        x = centres[rng.integers(0, len(centres), n)] + 0.9 * rng.standard_normal((n, dim)).astype(np.float32)
        chunks.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    return np.concatenate(chunks)


def bench_search(sizes: list[int], dim: int, queries: int, kinds: list[str], wider: dict[str, int]) -> None:
    from clipforge.collection.index import build_index, load_index
    from clipforge.collection.layout import write_part

    print(f"\n### Search over synthetic unit vectors ({dim}-d, clustered), {torch.get_num_threads()} torch threads\n")
    print("| vectors | index | build | size on disk | peak RSS | latency / query (1 x 512) | recall@10 vs exact |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for count in sizes:
        vectors = _clustered(count, dim, seed=count)
        probe = _clustered(queries, dim, seed=count + 1).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            emb = Path(tmp) / "emb"
            rows = [{"image_path": f"img_{i}.jpg", "caption": None, "size": None, "mtime": None}
                    for i in range(count)]
            write_part(emb, 0, vectors, rows, "img")
            exact_ids = None
            for kind in kinds:
                start = time.perf_counter()
                build_index(emb, Path(tmp) / kind, kind=kind)
                build = time.perf_counter() - start
                index = load_index(Path(tmp) / kind)
                disk = sum(p.stat().st_size for p in (Path(tmp) / kind).rglob("*") if p.is_file()) / 2**20
                settings = [{}] + ([wider] if kind != "exact" and wider else [])
                for options in settings:
                    index.search(probe[:1], 10, **options)  # warm-up (mmap, faiss load)
                    start = time.perf_counter()
                    ids = np.concatenate([index.search(probe[q:q + 1], 10, **options)[1] for q in range(len(probe))])
                    latency = (time.perf_counter() - start) / len(probe) * 1000
                    if kind == "exact":
                        exact_ids = ids
                    recall = (np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
                              if exact_ids is not None else float("nan"))
                    label = kind + (" " + ", ".join(f"{k}={v}" for k, v in options.items()) if options else "")
                    print(f"| {count:,} | {label} | {build:.1f} s | {disk:,.0f} MiB | {_rss_mib():,.0f} MiB | "
                          f"{latency:.1f} ms | {recall:.3f} |")
                    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("embed", "search"), default=None)
    parser.add_argument("--images", default="../shared/data/flickr8k/images")
    parser.add_argument("--model", default="ViT-B-32-quickgelu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["exact", "ivfpq"])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--wider", default="nprobe=1024,rerank=64",
                        help="search options for a second row per approximate index (key=value,...; '' for none)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"clipforge collection bench, {os.cpu_count()} CPUs, torch {torch.__version__}")
    if args.only in (None, "embed"):
        bench_embed(Path(args.images), args.model, args.batch_size, args.workers, args.precision)
    if args.only in (None, "search"):
        wider = {k: int(v) for k, v in (item.split("=") for item in args.wider.split(",") if item)}
        bench_search(args.sizes, 512, args.queries, args.kinds, wider)
    return 0


if __name__ == "__main__":
    sys.exit(main())
