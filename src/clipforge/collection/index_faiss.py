"""Approximate indexes (faiss IVF-PQ and HNSW, inner product) for collections too large to scan per query.

faiss only proposes candidates: the best ``rerank * k`` are rescored exactly from the stored float16
vectors, so scores are the same numbers exact search gives and recall is lost only when a true
neighbour is not proposed at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import ClipforgeError

FAISS_FILE = "faiss.index"
APPROXIMATE_KINDS = ("ivfpq", "hnsw")
MIN_IVFPQ = 1000  # fewer vectors cannot train the coarse and product quantizers (exact search is instant then)
ADD_CHUNK = 65536
DEFAULT_RERANK = 64  # candidates per wanted result that faiss proposes for exact rescoring (PQ ranks coarsely)
HNSW_M = 32


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ClipforgeError("approximate indexes (--kind ivfpq or hnsw) need faiss; install it with "
                             "pip install 'clipforge[faiss]', or use --kind exact") from None
    return faiss


def _float32(vectors: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(vectors[start:stop], dtype=np.float32)


def ivfpq_params(count: int, dim: int) -> dict[str, int]:
    """nlist ~ 4 sqrt(N) (at least 39 training points per list), PQ m the divisor of E nearest E/8, 8-bit codes
    when there are enough points to train 256 centroids per sub-quantizer."""
    nlist = max(1, min(round(4 * math.sqrt(count)), count // 39))
    target = max(1, dim // 8)
    pq_m = min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - target), m))
    nbits = max(4, min(8, int(math.log2(max(count, 16) / 39))))
    return {"nlist": nlist, "pq_m": pq_m, "nbits": nbits, "nprobe": max(1, min(nlist, round(nlist / 4) + 4))}  # recall@10 >= 0.95 at 1M (README)


def build_faiss(vectors: np.ndarray, kind: str, *, seed: int = 0, nlist: int | None = None,
                pq_m: int | None = None, hnsw_m: int = HNSW_M) -> tuple[Any, dict[str, Any]]:
    """(faiss index, the parameters to record in index.json) for float16 vectors [N, E]."""
    faiss = import_faiss()
    count, dim = vectors.shape
    if kind == "ivfpq":
        if count < MIN_IVFPQ:
            raise ClipforgeError(f"--kind ivfpq needs at least {MIN_IVFPQ} vectors to train its quantizers, but "
                                 f"there are {count}; use --kind exact, which is fast at this size")
        params = ivfpq_params(count, dim)
        if nlist is not None:
            params["nlist"] = max(1, min(nlist, count))
        if pq_m is not None:
            if pq_m < 1 or dim % pq_m:
                raise ClipforgeError(f"PQ m must divide the embedding size {dim}, got {pq_m}")
            params["pq_m"] = pq_m
        factory = f"IVF{params['nlist']},PQ{params['pq_m']}x{params['nbits']}"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        sample_size = min(count, max(params["nlist"] * 40, 256 * 40))  # faiss asks for 39 per centroid
        sample = np.sort(np.random.default_rng(seed).choice(count, sample_size, replace=False))
        index.cp.seed = seed
        index.do_polysemous_training = False  # Hamming-code reordering we never use; it costs most of the build
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        factory = f"HNSW{hnsw_m},SQfp16"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(_float32(vectors, 0, min(count, ADD_CHUNK)))  # fp16 scalar quantizer: nothing to learn
        params = {"m": hnsw_m, "ef_search": 64, "ef_construction": index.hnsw.efConstruction}
    else:
        raise ClipforgeError(f"unknown index kind {kind!r}; use exact, ivfpq or hnsw")
    for start in range(0, count, ADD_CHUNK):
        index.add(_float32(vectors, start, min(start + ADD_CHUNK, count)))
    return index, {"factory": factory, **params, "rerank": DEFAULT_RERANK}


def write_faiss(index: Any, path: Path) -> None:
    import_faiss().write_index(index, str(path))


def read_faiss(path: Path, folder: str) -> Any:
    faiss = import_faiss()
    if not path.is_file():
        raise ClipforgeError(f"index '{folder}' is approximate but its {FAISS_FILE} is missing; rebuild it with "
                             "clipforge index")
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        raise ClipforgeError(f"index '{folder}' has a damaged {FAISS_FILE}; rebuild it with clipforge index") from None


def faiss_candidates(index: Any, kind: str, params: dict[str, Any], queries: np.ndarray, wanted: int, *,
                     nprobe: int | None = None, ef_search: int | None = None) -> np.ndarray:
    """Candidate ids [Q, wanted] (-1 where faiss found fewer)."""
    faiss = import_faiss()
    if kind == "ivfpq":  # per-call parameters, so concurrent searches (clipforge serve) do not race
        search_params = faiss.SearchParametersIVF()
        search_params.nprobe = int(nprobe or params.get("nprobe") or 8)
    else:
        search_params = faiss.SearchParametersHNSW()
        search_params.efSearch = max(int(ef_search or params.get("ef_search") or 64), wanted)
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), wanted, params=search_params)
    return ids.astype(np.int64, copy=False)
