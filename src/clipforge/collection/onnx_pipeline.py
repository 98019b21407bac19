"""The embedding pipeline for an ONNX export: threads decode and preprocess while onnxruntime encodes. No torch.

It yields the same (part, batch) stream as ``pipeline.batches`` (same keys, numpy instead of tensors),
so ``embed`` writes parts the same way on either backend. Decoding and resizing run in Pillow, which
releases the GIL, so a thread pool overlaps them with the model as DataLoader workers do; batches
are read ahead in order, never more than ``PREFETCH`` per thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from clipforge.collection.sources import Source, Unusable
from clipforge.data.skips import UNREADABLE_IMAGE

PREFETCH = 2  # batches in flight per thread


class OnnxEncoder:
    """Encodes a batch of pixels [B, 3, S, S] in [0, 1] and/or token ids with an ``OnnxCLIP`` (float32)."""

    precision = "fp32"

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, pixels: np.ndarray | None,
                 tokens: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        images = self.model.encode_image_pixels(pixels) if pixels is not None else None
        texts = self.model.encode_tokens(tokens) if tokens is not None else None
        return images, texts


def _item(source: Source, preprocess: Callable[[Any], np.ndarray] | None, image: bool, text: bool,
          index: int) -> tuple:
    """As ``pipeline._Items``: (i, pixels, caption, row, skip reason, skip detail)."""
    try:
        loaded = source.load(index, image=image, text=text)
        pixels = preprocess(loaded.image) if image else None  # type: ignore[misc]
    except Unusable as bad:
        return index, None, None, None, bad.reason, bad.detail
    except Exception as error:  # noqa: BLE001 (a file that breaks the transform is a bad image, not a dead run)
        return index, None, None, None, UNREADABLE_IMAGE, f"{type(error).__name__}: {error}"
    return index, pixels, loaded.caption, loaded.row, None, None


def _collate(items: list[tuple], tokenizer: Callable[[list[str]], np.ndarray] | None, image: bool) -> dict[str, Any]:
    good = [item for item in items if item[4] is None]
    pixels = np.stack([item[1] for item in good]) if image and good else None
    tokens = tokenizer([item[2] for item in good]) if tokenizer is not None and good else None
    return {"indices": [item[0] for item in good], "rows": [item[3] for item in good], "pixels": pixels,
            "tokens": tokens, "skips": [(item[0], item[4], item[5]) for item in items if item[4] is not None],
            "count": len(items)}


def _plan_batches(plan: Sequence[tuple[int, int, int]], batch_size: int) -> Iterator[tuple[int, list[int]]]:
    for part, start, stop in plan:
        for first in range(start, stop, batch_size):
            yield part, list(range(first, min(first + batch_size, stop)))


def numpy_batches(source: Source, plan: Sequence[tuple[int, int, int]], *,
                  preprocess: Callable[[Any], np.ndarray] | None, tokenizer: Callable[[list[str]], np.ndarray] | None,
                  image: bool, batch_size: int, num_workers: int, **_: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(part, batch) for every batch of the plan, in order; ``num_workers`` threads prepare them (0: inline)."""
    text = tokenizer is not None

    def build(indices: list[int]) -> dict[str, Any]:
        return _collate([_item(source, preprocess, image, text, i) for i in indices], tokenizer, image)

    if num_workers == 0:
        for part, indices in _plan_batches(plan, batch_size):
            yield part, build(indices)
        return
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="clipforge-decode") as pool:
        pending: deque = deque()
        todo = _plan_batches(plan, batch_size)
        try:
            for part, indices in todo:
                pending.append((part, pool.submit(build, indices)))
                if len(pending) >= num_workers * PREFETCH:
                    done_part, future = pending.popleft()
                    yield done_part, future.result()
            while pending:
                done_part, future = pending.popleft()
                yield done_part, future.result()
        finally:
            for _, future in pending:  # the caller stopped early: drop what was read ahead
                future.cancel()
