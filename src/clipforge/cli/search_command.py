"""``clipforge search INDEX`` (by text, image, embedding or indexed item) and ``clipforge dedup INDEX``.

Both print a table by default and JSON with ``--json``. The index opens memory-mapped; only text and
image queries load the model the index was built with.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipforge.errors import ClipforgeError


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity such as 0.95, got {text[:40]!r}") from None
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity between -1 and 1, got {value}")
    return value


def _approximate_options(parser: argparse.ArgumentParser) -> None:
    from clipforge.cli.main import positive_int

    parser.add_argument("--exact", action="store_true", help="scan every vector even if the index is approximate")
    parser.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists visited (--kind ivfpq indexes)")
    parser.add_argument("--ef", type=positive_int, default=None, help="HNSW search breadth (--kind hnsw indexes)")


def add_search_parsers(sub: argparse._SubParsersAction) -> None:
    from clipforge.cli.main import add_threads_option, positive_int

    search = sub.add_parser("search", help="search an index by text, image, embedding or an indexed item")
    search.add_argument("index_dir", metavar="INDEX", help="index folder written by clipforge index")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="words to search for, e.g. 'a dog on a beach'")
    query.add_argument("--image", help="an image file: find items that look like it")
    query.add_argument("--embedding", metavar="FILE.npy", help="a .npy query embedding, [E] or [1, E]")
    query.add_argument("--like", metavar="PATH_OR_ID", help="an indexed item (its id or image path): more like it")
    search.add_argument("-k", "--top", dest="k", type=positive_int, default=10, help="results to show (default 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--device", default="cpu", help="where text and image queries are encoded")
    _approximate_options(search)
    add_threads_option(search)
    search.set_defaults(run=run_search_command)

    dedup = sub.add_parser("dedup", help="list near-duplicate pairs of an index")
    dedup.add_argument("index_dir", metavar="INDEX", help="index folder written by clipforge index")
    dedup.add_argument("--threshold", type=_threshold, default=0.95,
                       help="smallest cosine similarity reported (default 0.95)")
    dedup.add_argument("-k", "--neighbours", dest="k", type=positive_int, default=10,
                       help="nearest neighbours checked per item (default 10)")
    dedup.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _approximate_options(dedup)
    add_threads_option(dedup)
    dedup.set_defaults(run=run_dedup_command)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"exact": args.exact, "nprobe": args.nprobe, "ef_search": args.ef}


def _cell(text: Any, longest: int = 80) -> str:
    """A table cell on one line, undecodable bytes escaped, long text cut."""
    text = " ".join(str("" if text is None else text).encode("utf-8", "backslashreplace").decode().split())
    return text if len(text) <= longest else text[:longest - 3] + "..."


def _read_embedding(path: str) -> Any:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ClipforgeError(f"embedding file '{path[:120]}' does not exist; pass a .npy file") from None
    except (OSError, ValueError, EOFError) as error:
        raise ClipforgeError(f"'{path[:120]}' is not a readable .npy array ({' '.join(str(error).split())[:80]}); "
                             "save the query with numpy.save") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.ndim not in (1, 2) \
            or array.ndim == 2 and array.shape[0] != 1:
        raise ClipforgeError(f"'{path[:120]}' holds a {getattr(array, 'dtype', '?')} array of shape "
                             f"{tuple(getattr(array, 'shape', ()))}; a query embedding is one vector, [E] or [1, E]")
    return array.reshape(-1)


def run_search_command(args: argparse.Namespace) -> int:
    from clipforge.cli.main import _print_table, apply_threads
    from clipforge.collection import search
    from clipforge.collection.index import load_index

    index = load_index(args.index_dir)
    apply_threads(args, torch_too=not _onnx_index(index))
    options = _options(args)
    if args.text is not None:
        if not args.text.strip():
            raise ClipforgeError("--text is empty; type some words to search for")
        query: dict[str, Any] = {"text": args.text}
        hits = search.search_text(index, args.text, args.k, device=_device(args, index), **options)
    elif args.image is not None:
        query = {"image": args.image}
        hits = search.search_image(index, args.image, args.k, device=_device(args, index), **options)
    elif args.embedding is not None:
        query = {"embedding": args.embedding}
        hits = search.search_embedding(index, _read_embedding(args.embedding), args.k, **options)
    else:
        item = search.find_item(index, args.like)
        query = {"like": item, "path": index.item(item).get("image_path")}
        hits = search.more_like_this(index, item, args.k, **options)
    if args.json:
        print(json.dumps({"index": str(index.folder), "query": query, "count": len(index),
                          "results": [{"rank": rank, **hit.to_dict()} for rank, hit in enumerate(hits, 1)]},
                         indent=2, ensure_ascii=False))
        return 0
    _print_table(("rank", "score", "id", "path", "caption"),
                 [(str(rank), f"{hit.score:.4f}", str(hit.id), _cell(hit.path, 100), _cell(hit.caption))
                  for rank, hit in enumerate(hits, 1)])
    return 0


def _onnx_index(index: Any) -> bool:
    """Whether the index's query model is an ONNX export (then torch is never imported)."""
    from clipforge.runtime import is_onnx_export

    return bool(index.model_spec) and is_onnx_export(index.model_spec.get("source"))


def _device(args: argparse.Namespace, index: Any) -> Any:
    if _onnx_index(index):
        from clipforge.runtime import check_cpu_device

        return check_cpu_device(args.device)
    from clipforge.cli.devices import resolve_device

    return resolve_device(args.device)


def run_dedup_command(args: argparse.Namespace) -> int:
    from clipforge.cli.main import _print_table, apply_threads
    from clipforge.collection.index import load_index
    from clipforge.collection.search import near_duplicates

    index = load_index(args.index_dir)
    apply_threads(args, torch_too=not _onnx_index(index))
    pairs = near_duplicates(index, args.threshold, args.k, progress=len(index) > 100_000 and sys.stderr.isatty(),
                            **_options(args))
    paths = index.items.column("image_path")
    if args.json:
        print(json.dumps({"index": str(index.folder), "threshold": args.threshold, "count": len(pairs),
                          "pairs": [{"i": p.i, "j": p.j, "score": round(p.score, 6), "path_i": paths[p.i].as_py(),
                                     "path_j": paths[p.j].as_py()} for p in pairs]}, indent=2, ensure_ascii=False))
        return 0
    if not pairs:
        print(f"no pairs of the {len(index)} items have cosine similarity {args.threshold} or more")
        return 0
    _print_table(("score", "i", "j", "path i", "path j"),
                 [(f"{p.score:.4f}", str(p.i), str(p.j), _cell(paths[p.i].as_py(), 70), _cell(paths[p.j].as_py(), 70))
                  for p in pairs])
    print(f"\n{len(pairs)} near-duplicate pairs (cosine >= {args.threshold}) among {len(index)} items")
    return 0
