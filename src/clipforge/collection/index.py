"""A searchable index of embeddings: ``index.json``, ``vectors.npy`` (float16, memory-mapped) and ``items.parquet``.

Row i of ``items.parquet`` (image_path, caption, size, mtime) describes ``vectors[i]``. Exact search
scans the memory-mapped vectors, so an index of any size opens instantly and costs no memory until
searched; ``--kind ivfpq`` / ``hnsw`` add a ``faiss.index`` that proposes candidates, which are
rescored exactly from the same vectors. ``build_index`` (collection/index_build.py) writes the folder
whole or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipforge.errors import ClipforgeError

if TYPE_CHECKING:
    import pyarrow
    import torch

INDEX_FORMAT = "clipforge-index"
INDEX_VERSION = 1
INFO_FILE, VECTORS_FILE, ITEMS_FILE, EMBEDDINGS_DIR = "index.json", "vectors.npy", "items.parquet", "embeddings"
KINDS = ("exact", "ivfpq", "hnsw")
ITEM_COLUMNS = ("image_path", "caption", "size", "mtime")
SPEC_FIELDS = ("source", "pretrained", "quick_gelu", "model_config", "image_size")


def import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ClipforgeError("indexes store their items with pyarrow; install it with "
                             "pip install 'clipforge[search]'") from None
    return pyarrow


def model_spec(source: str | os.PathLike | dict[str, Any], pretrained: str | None = None,
               quick_gelu: bool | None = None, model_config: str | dict | None = None,
               image_size: int | None = None) -> dict[str, Any]:
    """The arguments ``clipforge.load`` needs to rebuild the model, as recorded in index.json.

    Local paths are made absolute so the index can be searched from any working directory; a dict
    (another index's spec) is taken as it is, with the keyword arguments overriding its fields.
    """
    spec: dict[str, Any] = dict.fromkeys(SPEC_FIELDS)
    if isinstance(source, dict):
        spec.update({key: source.get(key) for key in SPEC_FIELDS})
    else:
        spec["source"] = os.fspath(source)
    for key, value in (("pretrained", pretrained), ("quick_gelu", quick_gelu), ("model_config", model_config),
                       ("image_size", image_size)):
        if value is not None:
            spec[key] = value
    for key in ("source", "model_config"):
        value = spec[key]
        if isinstance(value, (str, os.PathLike)) and os.path.exists(os.path.expanduser(os.fspath(value))):
            spec[key] = os.path.abspath(os.path.expanduser(os.fspath(value)))
    return spec


class Index:
    """An opened index folder. ``search`` is exact over all vectors, or faiss candidates rescored exactly."""

    def __init__(self, folder: Path, info: dict[str, Any], vectors: np.ndarray, items: pyarrow.Table) -> None:
        self.folder, self.info, self.vectors, self.items = folder, info, vectors, items
        self._faiss: Any = None
        self._paths: dict[str, int] | None = None
        self._query_models: dict[str, Any] = {}  # device -> (model, preprocess), filled by search.load_query_model

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def __repr__(self) -> str:
        return f"Index('{self.folder}', {len(self)} x {self.embed_dim}, kind={self.kind})"

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def embed_dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def model_spec(self) -> dict[str, Any] | None:
        """What ``clipforge.load`` needs to encode queries for this index (None: built from embeddings that
        recorded no model, so only embedding and more-like-this queries work)."""
        spec = self.info.get("model")
        return dict(spec) if spec else None

    def vector(self, item_id: int) -> np.ndarray:
        """Item ``item_id``'s embedding as float32 [E]."""
        return np.asarray(self.vectors[self.check_id(item_id)], dtype=np.float32)

    def item(self, item_id: int) -> dict[str, Any]:
        return self.items.slice(self.check_id(item_id), 1).to_pylist()[0]

    def check_id(self, item_id: Any) -> int:
        if isinstance(item_id, (bool, np.bool_)) or not isinstance(item_id, (int, np.integer)) \
                or not 0 <= item_id < len(self):
            raise ClipforgeError(f"item id {str(item_id)[:40]!r} is not in index '{self.folder}'; ids are whole "
                                 f"numbers from 0 to {len(self) - 1}")
        return int(item_id)

    def id_of(self, path: str | os.PathLike) -> int | None:
        """The id of the item whose image_path is ``path`` (as stored, or made absolute), else None."""
        if self._paths is None:
            self._paths = {str(p): i for i, p in enumerate(self.items.column("image_path").to_pylist())}
        given = os.fspath(path)
        for candidate in (given, os.path.abspath(given)):
            if candidate in self._paths:
                return self._paths[candidate]
        return None

    def search(self, queries: np.ndarray, k: int, *, exact: bool = False, nprobe: int | None = None,
               ef_search: int | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, min(k, N)] float32, ids [Q, min(k, N)] int64) by inner product, best first, ties to the
        lower id. Approximate kinds may return id -1 (score -inf) where faiss proposed too few candidates;
        ``exact=True`` scans every vector whatever the kind."""
        from clipforge.collection.index_exact import exact_search, rescore

        queries = self.check_queries(queries)
        k = check_k(k)
        if exact or self.kind == "exact":
            return exact_search(self.vectors, queries, k)
        from clipforge.collection.index_faiss import faiss_candidates

        params = self.info.get("faiss") or {}
        k = min(k, len(self))
        wanted = min(len(self), max(k, int(rerank or params.get("rerank") or 1) * k))
        candidates = faiss_candidates(self._faiss_index(), self.kind, params, queries, wanted, nprobe=nprobe,
                                      ef_search=ef_search)
        return rescore(self.vectors, queries, candidates, k)

    def check_queries(self, queries: Any) -> np.ndarray:
        """Queries as float32 [Q, E], refusing another dimension and non-finite values in one sentence."""
        array = np.asarray(queries, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != self.embed_dim:
            raise ClipforgeError(f"query embeddings of shape {tuple(np.shape(queries))} do not fit index "
                                 f"'{self.folder}', whose vectors have {self.embed_dim} dimensions; pass [E] or "
                                 f"[Q, {self.embed_dim}] from the model the index was built with")
        if array.shape[0] == 0:
            raise ClipforgeError("no queries given; pass at least one")
        if not np.isfinite(array).all():
            raise ClipforgeError("query embeddings hold NaN or infinite values; pass finite numbers")
        return array

    def recall_at(self, k: int = 10, sample: int = 1000, *, seed: int = 0, **search_options: Any) -> float:
        """Mean recall@k of ``search`` against exact search, with ``sample`` stored vectors as queries.

        Each query is held out of its own results (both lists leave its id out), so the trivial
        self-match does not inflate the number.
        """
        k, count = check_k(k), len(self)
        if count < 2:
            return 1.0
        k = min(k, count - 1)
        ids = np.sort(np.random.default_rng(seed).choice(count, min(sample, count), replace=False))
        queries = np.asarray(self.vectors[ids], dtype=np.float32)
        _, approx = self.search(queries, k + 1, **search_options)
        _, truth = self.search(queries, k + 1, exact=True)
        hits = 0
        for own, found, true in zip(ids, approx, truth):
            true_set = [i for i in true if i != own][:k]
            found_set = [i for i in found if i != own and i >= 0][:k]
            hits += len(set(true_set) & set(found_set))
        return hits / (len(ids) * k)

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            from clipforge.collection.index_faiss import FAISS_FILE, read_faiss

            self._faiss = read_faiss(self.folder / FAISS_FILE, str(self.folder))
        return self._faiss


def check_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClipforgeError(f"k must be a whole number of results, 1 or more, got {str(k)[:40]!r}")
    return int(k)


def _damaged(folder: Path, what: str) -> ClipforgeError:
    return ClipforgeError(f"index '{folder}' is damaged ({what}); rebuild it with clipforge index SOURCE {folder}")


def read_info(folder: Path) -> dict[str, Any]:
    """index.json, checked: one sentence for a missing folder, a folder that is no index, or a damaged file."""
    if not folder.exists():
        raise ClipforgeError(f"index folder '{folder}' does not exist; build one with clipforge index SOURCE {folder}")
    if not folder.is_dir():
        raise ClipforgeError(f"'{folder}' is a file, not an index folder; pass the folder clipforge index wrote")
    path = folder / INFO_FILE
    if not path.is_file():
        raise ClipforgeError(f"'{folder}' is not a clipforge index (it has no {INFO_FILE}); build one with "
                             f"clipforge index SOURCE {folder}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _damaged(folder, f"{INFO_FILE} cannot be read: {' '.join(str(error).split())[:80]}") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise _damaged(folder, f"{INFO_FILE} is not a clipforge index description")
    if not isinstance(info.get("version"), int) or info["version"] > INDEX_VERSION:
        raise ClipforgeError(f"index '{folder}' has format version {info.get('version')!r}, newer than this "
                             f"clipforge reads ({INDEX_VERSION}); upgrade clipforge or rebuild the index")
    for key, kind in (("count", int), ("embed_dim", int), ("kind", str)):
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise _damaged(folder, f"{INFO_FILE} has no valid '{key}'")
    if info["kind"] not in KINDS:
        raise _damaged(folder, f"{INFO_FILE} names an unknown kind {info['kind'][:20]!r}")
    if info.get("model") is not None and not isinstance(info["model"], dict):
        raise _damaged(folder, f"{INFO_FILE} has a 'model' that is not a model description")
    return info


def load_index(index_dir: str | os.PathLike) -> Index:
    """Open an index folder; the vectors are memory-mapped, so this is quick at any size."""
    pyarrow = import_pyarrow()
    folder = Path(index_dir).expanduser()
    info = read_info(folder)
    try:
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="c")  # copy-on-write: writable for torch, never saved
    except FileNotFoundError:
        raise _damaged(folder, f"{VECTORS_FILE} is missing") from None
    except (OSError, ValueError, EOFError) as error:
        raise _damaged(folder, f"{VECTORS_FILE} cannot be read: {' '.join(str(error).split())[:80]}") from None
    if vectors.dtype != np.float16 or vectors.ndim != 2 or vectors.shape[1] != info["embed_dim"]:
        raise _damaged(folder, f"{VECTORS_FILE} holds {vectors.dtype} {tuple(vectors.shape)}, not float16 "
                               f"[{info['count']}, {info['embed_dim']}]")
    try:
        items = pyarrow.parquet.read_table(folder / ITEMS_FILE)
    except FileNotFoundError:
        raise _damaged(folder, f"{ITEMS_FILE} is missing") from None
    except (OSError, pyarrow.ArrowException) as error:
        raise _damaged(folder, f"{ITEMS_FILE} cannot be read: {' '.join(str(error).split())[:80]}") from None
    if "image_path" not in items.column_names:
        raise _damaged(folder, f"{ITEMS_FILE} has no image_path column")
    if not vectors.shape[0] == items.num_rows == info["count"]:
        raise _damaged(folder, f"{INFO_FILE} counts {info['count']} items, {VECTORS_FILE} holds {vectors.shape[0]} "
                               f"vectors and {ITEMS_FILE} {items.num_rows} rows")
    return Index(folder, info, vectors, items)


def build_index(source: str | os.PathLike, index_dir: str | os.PathLike, *,
                model: str | os.PathLike | dict[str, Any] | None = None, pretrained: str | None = None,
                quick_gelu: bool | None = None, model_config: str | dict | None = None,
                image_size: int | None = None, kind: str = "exact", incremental: bool = True,
                batch_size: int = 64, num_workers: int = 2, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, nlist: int | None = None, pq_m: int | None = None,
                hnsw_m: int = 32, seed: int = 0, log: Any = None) -> Index:
    """Index an embeddings folder (``clipforge embed``'s clip-retrieval layout) or an image folder.

    An image folder needs ``model`` (anything ``clipforge.load`` takes, with its pretrained /
    quick_gelu / model_config / image_size arguments); its embeddings are also kept in clip-retrieval
    layout under ``INDEX/embeddings/``. With ``incremental`` a rebuild of the same folder with the same
    model embeds only new and changed files (by path, size and mtime) and drops deleted ones. The folder
    is replaced only once the new index is complete. ``log`` (a print-like function) hears progress.
    """
    from clipforge.collection.index_build import build

    return build(source, index_dir, model=model, pretrained=pretrained, quick_gelu=quick_gelu,
                 model_config=model_config, image_size=image_size, kind=kind, incremental=incremental,
                 batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype, nlist=nlist,
                 pq_m=pq_m, hnsw_m=hnsw_m, seed=seed, log=log)
