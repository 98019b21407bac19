"""Exact top-k inner-product search over float16 vectors that stay on disk (memory-mapped).

Each chunk of rows is converted to float32 into one reused buffer (so it is still in cache for the
matrix product, and no memory is allocated per chunk), scored against every query, and the running
top-k merged. Ties are broken by the lower id, so results never depend on chunk sizes or threads.

The conversion runs as copies smaller than torch's parallel grain, so it never opens a thread team:
on a machine whose cores are busy with other work a parallel copy per chunk waits for a descheduled
thread each time (measured here: 380 ms instead of 9 ms per query over 100k x 512).

torch does the products when it is already imported (the torch model path); otherwise (the ONNX
runtime path, or search by embedding) numpy does them, so searching never imports torch. Both give
the same ids and the same scores to float32 rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

CHUNK_ROWS = 2048  # float32 chunk of 2048 x 512 = 4 MiB: converted and multiplied while in cache
SCORE_BUDGET = 1 << 23  # floats held at once in the [queries, rows] score block (32 MiB)
SERIAL_COPY = 32768  # elements: torch's GRAIN_SIZE, below which a copy runs on the calling thread


def _torch() -> Any:
    """torch if this process has already imported it, else None (numpy is used instead)."""
    return sys.modules.get("torch")


def _convert(target: Any, source: Any) -> None:
    """target.copy_(source) in serial pieces (one C++ loop via _foreach_copy_ where torch has it)."""
    torch = _torch()
    step = max(1, SERIAL_COPY // max(1, source.shape[1]))
    pieces, into = source.split(step), target.split(step)
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(list(into), list(pieces))
    else:
        for part, piece in zip(into, pieces):
            part.copy_(piece)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, *, chunk_rows: int = CHUNK_ROWS,
                 score_budget: int = SCORE_BUDGET) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, min(k, N)] float32, ids [Q, min(k, N)] int64), best first, ties to the lower id.

    ``vectors`` is [N, E] (float16 memmap or any float array); ``queries`` [Q, E] float32.
    """
    count, dim = vectors.shape
    k = min(k, count)
    query = np.ascontiguousarray(queries, dtype=np.float32)
    q_count = query.shape[0]
    if q_count == 0 or k == 0:
        return np.zeros((q_count, k), np.float32), np.zeros((q_count, k), np.int64)
    chunk_rows = max(1, min(chunk_rows, count))
    block = max(chunk_rows, (score_budget // q_count) // chunk_rows * chunk_rows)
    score_chunk = _chunk_scorer(query, chunk_rows, dim)
    best_scores = best_ids = None
    for start in range(0, count, block):
        stop = min(start + block, count)
        scores = np.empty((q_count, stop - start), np.float32)
        for row in range(start, stop, chunk_rows):
            end = min(row + chunk_rows, stop)
            score_chunk(vectors[row:end], scores[:, row - start:end - start])
        top_scores, top_ids = _block_topk(scores, min(k, stop - start))
        top_ids += start
        if best_scores is None:
            best_scores, best_ids = top_scores, top_ids
        else:
            best_scores, best_ids = _merge(best_scores, best_ids, top_scores, top_ids, k)
    return best_scores, best_ids


def _chunk_scorer(query: np.ndarray, chunk_rows: int, dim: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """``score(rows, out)``: ``out[:] = query @ rows.T``, ``rows`` converted to float32 in one reused buffer;
    torch's product when torch is loaded, numpy's otherwise."""
    torch = _torch()
    if torch is None:
        buffer = np.empty((chunk_rows, dim), np.float32)

        def score(rows: np.ndarray, out: np.ndarray) -> None:
            part = buffer[:rows.shape[0]]
            np.copyto(part, rows, casting="unsafe")
            out[...] = query @ part.T
        return score
    torch_query, torch_buffer = torch.from_numpy(query), torch.empty(chunk_rows, dim, dtype=torch.float32)

    def score(rows: np.ndarray, out: np.ndarray) -> None:
        part = torch_buffer[:rows.shape[0]]
        _convert(part, torch.from_numpy(np.asarray(rows)))
        torch.mm(torch_query, part.T, out=torch.from_numpy(out))
    return score


def _block_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row, ties to the lower column. numpy's argpartition (one thread, like the copies),
    redone for the rows whose k-th score is tied with columns the partition left out."""
    width = scores.shape[1]
    ids = np.argpartition(scores, width - k, axis=1)[:, width - k:].astype(np.int64)
    values = np.take_along_axis(scores, ids, 1)
    kth = values.min(axis=1, keepdims=True)
    for row in np.flatnonzero((scores >= kth).sum(axis=1) > k).tolist():
        line = scores[row]
        candidates = np.flatnonzero(line >= kth[row, 0])
        order = np.lexsort((candidates, -line[candidates]))[:k]
        ids[row], values[row] = candidates[order], line[candidates[order]]
    order = np.lexsort((ids, -values), axis=-1)  # best first, equal scores by lower id
    return np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)


def _merge(scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def rescore(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among each query's candidate ids (-1 = none), as exact_search would rank them.

    Approximate indexes propose candidates; scoring them here from the stored vectors makes their
    scores and tie order the same as exact search's.
    """
    q_count = queries.shape[0]
    out_scores = np.full((q_count, k), -np.inf, np.float32)
    out_ids = np.full((q_count, k), -1, np.int64)
    for row in range(q_count):
        ids = np.unique(candidates[row][candidates[row] >= 0])  # sorted, so ties resolve to the lower id
        if ids.size == 0:
            continue
        rows = np.asarray(vectors[ids], dtype=np.float32)
        query = np.ascontiguousarray(queries[row], dtype=np.float32)
        torch = _torch()
        scores = (torch.from_numpy(rows) @ torch.from_numpy(query)).numpy() if torch is not None else rows @ query
        order = np.lexsort((ids, -scores))[:k]
        out_scores[row, :order.size], out_ids[row, :order.size] = scores[order], ids[order]
    return out_scores, out_ids
