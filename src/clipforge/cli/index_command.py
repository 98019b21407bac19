"""``clipforge index SOURCE INDEX``: a searchable index of an image folder or of ``clipforge embed``'s output.

Rerunning it on the same image folder embeds only new and changed files; the index folder is
replaced only once the new one is complete. An approximate index (``--kind ivfpq`` / ``hnsw``) is
followed by its measured recall@10 against exact search, so the trade is visible.
"""

from __future__ import annotations

import argparse
import time

from clipforge.errors import ClipforgeError

RECALL_K = 10


def add_index_parser(sub: argparse._SubParsersAction, gelu_help: str) -> argparse.ArgumentParser:
    from clipforge.cli.convert_command import add_architecture_options
    from clipforge.cli.main import add_threads_option, non_negative_int, positive_int

    index = sub.add_parser("index", help="build a searchable index of an image folder or an embeddings folder",
                           description="SOURCE is a folder of images (embedded with --model) or a folder written by "
                                       "clipforge embed (img_emb/, metadata/). Rerunning on the same image folder "
                                       "embeds only new and changed files.")
    index.add_argument("source_path", metavar="SOURCE", help="image folder, or clipforge embed's output folder")
    index.add_argument("index_dir", metavar="INDEX", help="index folder to write (replaced whole when complete)")
    index.add_argument("--model", default=None,
                       help="model that embeds the images (needed for an image folder; an embeddings folder names "
                            "its own): checkpoint path, released name (ViT-B-32), ARCH/TAG, hf-hub:ORG/REPO, or a "
                            "clipforge export --to onnx folder (onnxruntime, no torch)")
    index.add_argument("--kind", choices=("exact", "ivfpq", "hnsw"), default="exact",
                       help="exact (scan every vector; fine to a few million), ivfpq or hnsw (faiss, approximate)")
    index.add_argument("--full", action="store_true", help="embed every image again instead of reusing unchanged ones")
    index.add_argument("--batch-size", type=positive_int, default=64, help="images embedded at once")
    index.add_argument("--workers", type=non_negative_int, default=2, help="image-decoding worker processes")
    index.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    index.add_argument("--nlist", type=positive_int, default=None,
                       help="IVF lists for --kind ivfpq (default 4 sqrt(N))")
    index.add_argument("--recall-queries", type=non_negative_int, default=1000,
                       help="stored vectors used as queries to measure recall@10 of an approximate index (0: skip)")
    add_threads_option(index)
    index.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    add_architecture_options(index)
    index.set_defaults(run=run_index_command)
    return index


def run_index_command(args: argparse.Namespace) -> int:
    import sys

    from clipforge.cli.main import apply_threads
    from clipforge.collection.index import build_index

    if args.model is None and any(getattr(args, name) is not None
                                  for name in ("model_config", "pretrained", "image_size")) \
            or args.model is None and args.quick_gelu is not None:
        raise ClipforgeError("--model-config, --pretrained, --image-size and --quick-gelu describe --model; pass "
                             "--model too")
    from clipforge.runtime import check_cpu_device, is_onnx_export

    onnx = is_onnx_export(args.model) or (args.model is None and _embedded_by_onnx(args.source_path))
    if onnx:  # onnxruntime on the CPU; torch is never imported
        if any(getattr(args, name) is not None for name in ("model_config", "pretrained", "image_size",
                                                              "quick_gelu")):
            raise ClipforgeError("--model-config, --pretrained, --image-size and --quick-gelu do not apply to an "
                                 "ONNX export (they are fixed when exporting); drop them")
        device = check_cpu_device(args.device)
    else:
        from clipforge.cli.devices import resolve_device

        device = resolve_device(args.device)
    apply_threads(args, torch_too=not onnx)
    started = time.time()
    index = build_index(args.source_path, args.index_dir, model=args.model, pretrained=args.pretrained,
                        quick_gelu=args.quick_gelu, model_config=args.model_config, image_size=args.image_size,
                        kind=args.kind, incremental=not args.full, batch_size=args.batch_size,
                        num_workers=args.workers, device=device, nlist=args.nlist,
                        log=lambda message: print(message, file=sys.stderr))
    build = index.info.get("build") or {}
    print(f"indexed {len(index)} items of {index.embed_dim} dimensions into {index.folder} ({index.kind}) in "
          f"{time.time() - started:.1f} s: {build.get('embedded', 0)} embedded, {build.get('reused', 0)} reused, "
          f"{build.get('removed', 0)} removed, {build.get('skipped', 0)} skipped")
    for item in build.get("skipped_items", [])[:5]:
        print(f"skipped: {item.get('detail') or item.get('error') or item}", file=sys.stderr)
    if index.kind != "exact" and args.recall_queries:
        measured = time.time()
        recall = index.recall_at(RECALL_K, args.recall_queries)
        print(f"recall@{RECALL_K} against exact search on {min(args.recall_queries, len(index))} held-out queries: "
              f"{recall:.3f} ({time.time() - measured:.1f} s to measure)")
    return 1 if build.get("skipped") else 0


def _embedded_by_onnx(source: str) -> bool:
    """Whether SOURCE is an embeddings folder whose embed_info.json names an ONNX export as its model."""
    import json
    import os

    from clipforge.runtime import is_onnx_export

    try:
        with open(os.path.join(source, "embed_info.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    model = info.get("model") if isinstance(info, dict) else None
    if isinstance(model, dict):
        model = model.get("model") or model.get("source")
    return isinstance(model, str) and is_onnx_export(model)
