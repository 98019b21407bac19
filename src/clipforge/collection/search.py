"""Queries against an index: by text, by image, by embedding, more-like-this, and near-duplicate pairs.

Text and image queries are encoded by the model the index records (``Index.model_spec``), loaded
once per index and device. One query (a string, an image, a 1-D vector) gives one list of results;
a list of queries gives one list per query.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np

from clipforge.collection.index import Index, check_k
from clipforge.errors import ClipforgeError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from clipforge.models.clip import CLIP

TEXT_BATCH = 256
IMAGE_BATCH = 64
DUPLICATE_CHUNK = 1024  # query rows per exact scan in near_duplicates: memory stays bounded at any size

_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class SearchResult:
    """One hit: the item's id (row of the index), its image path and caption, and the cosine score."""

    id: int
    path: str | None
    caption: str | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(self.score, 6), "path": self.path, "caption": self.caption}


class DuplicatePair(NamedTuple):
    """Items i < j whose embeddings have cosine similarity ``score``."""

    i: int
    j: int
    score: float


def load_model(spec: dict[str, Any], device: Any = "cpu") -> tuple[CLIP, Callable[[Any], torch.Tensor] | None]:
    """(model, preprocess) for a model spec (index.json's ``model``), loaded once per spec and device.

    A spec whose source is an ONNX export folder gives an ``OnnxCLIP`` (onnxruntime, no torch import).
    """
    from clipforge.runtime import check_cpu_device, is_onnx_export

    if is_onnx_export(spec.get("source")):
        key = (json.dumps(spec, sort_keys=True, default=str), check_cpu_device(device))
        with _MODELS_LOCK:
            if key not in _MODELS:
                from clipforge.runtime.onnx_model import OnnxCLIP

                model = OnnxCLIP.load(spec["source"])
                _MODELS[key] = (model, model.preprocess)
            return _MODELS[key]
    import torch

    from clipforge.checkpoints import load

    key = (json.dumps(spec, sort_keys=True, default=str), str(torch.device(device)))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load(spec["source"], device=device, quick_gelu=spec.get("quick_gelu"),
                                model=spec.get("model_config"), pretrained=spec.get("pretrained"),
                                image_size=spec.get("image_size"))
        return _MODELS[key]


def load_query_model(index: Index, device: Any = None) -> tuple[CLIP, Callable[[Any], torch.Tensor] | None]:
    """(model, preprocess) that encodes queries for ``index``: the model it was built with, with the same
    pretrained / model_config / quick_gelu / image_size arguments. ``device=None``: the device this
    index's model was first loaded on, else the CPU."""
    spec = index.model_spec
    if spec is None:
        raise ClipforgeError(f"index '{index.folder}' records no model (its embeddings came without one), so it "
                             "cannot encode text or image queries; search it by --embedding or --like, or rebuild "
                             "it with --model")
    if device is None and index._query_models:
        return next(iter(index._query_models.values()))
    model, preprocess = load_model(spec, "cpu" if device is None else device)
    dim = int(model.config.embed_dim)
    if dim != index.embed_dim:
        raise ClipforgeError(f"model '{spec['source']}' gives {dim}-dimensional embeddings but index "
                             f"'{index.folder}' holds {index.embed_dim}; the checkpoint changed since the index was "
                             "built, so rebuild it")
    index._query_models.setdefault(str(device), (model, preprocess))
    return model, preprocess


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_text_queries(model: CLIP, texts: str | Sequence[str]) -> np.ndarray:
    """L2-normalised float32 [Q, E] text embeddings, with the model's own tokenizer and context length."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ClipforgeError("no text queries given; pass at least one text")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ClipforgeError(f"text query {str(text)[:40]!r} is empty; type some words to search for")
    if getattr(model, "backend", None) == "onnx":
        return model.encode_text(texts, batch_size=TEXT_BATCH)
    import torch

    device, out = _device_of(model), []
    with torch.no_grad():
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = model.tokenize(texts[start:start + TEXT_BATCH]).to(device)
            out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out).numpy()


def encode_image_queries(model: CLIP, preprocess: Callable[[Any], torch.Tensor],
                         images: str | os.PathLike | Image.Image | Sequence[Any]) -> np.ndarray:
    """L2-normalised float32 [Q, E] embeddings of image files or PIL images (a bad file is one sentence)."""
    from PIL import Image

    from clipforge.transforms import load_image

    if preprocess is None:
        raise ClipforgeError("this model has no image tower, so it cannot encode image queries; search by text")
    single = isinstance(images, (str, os.PathLike, Image.Image))
    images = [images] if single else list(images)  # type: ignore[list-item]
    if not images:
        raise ClipforgeError("no image queries given; pass at least one image")
    if getattr(model, "backend", None) == "onnx":
        pixels = [preprocess(image if isinstance(image, Image.Image) else load_image(image)) for image in images]
        return np.concatenate([model.encode_image_pixels(np.stack(pixels[start:start + IMAGE_BATCH]))
                               for start in range(0, len(pixels), IMAGE_BATCH)])
    import torch

    device, out = _device_of(model), []
    with torch.no_grad():
        for start in range(0, len(images), IMAGE_BATCH):
            pixels = [preprocess(image if isinstance(image, Image.Image) else load_image(image))
                      for image in images[start:start + IMAGE_BATCH]]
            out.append(model.encode_image(torch.stack(pixels).to(device), normalize=True).float().cpu())
    return torch.cat(out).numpy()


def results(index: Index, scores: np.ndarray, ids: np.ndarray) -> list[list[SearchResult]]:
    """SearchResult lists from Index.search's arrays (ids of -1, where faiss found too few, left out)."""
    found = ids[ids >= 0]
    rows = index.items.select([c for c in ("image_path", "caption") if c in index.items.column_names])
    looked_up = rows.take(found).to_pylist() if found.size else []
    by_id = dict(zip(found.tolist(), looked_up))
    return [[SearchResult(int(i), by_id[i].get("image_path"), by_id[i].get("caption"), float(s))
             for s, i in zip(line_scores, line_ids.tolist()) if i >= 0]
            for line_scores, line_ids in zip(scores, ids)]


def _one_or_many(hits: list[list[SearchResult]], single: bool) -> Any:
    return hits[0] if single else hits


def search_embedding(index: Index, vectors: Any, k: int = 10, **options: Any) -> Any:
    """Nearest items to query embeddings ([E] -> one list, [Q, E] -> a list per query), normalised first so
    scores are cosines. ``options`` go to Index.search (exact, nprobe, ef_search, rerank)."""
    queries = index.check_queries(vectors)
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ClipforgeError("a query embedding is all zeros, which has no direction to search along")
    scores, ids = index.search(queries / norms, k, **options)
    return _one_or_many(results(index, scores, ids), np.ndim(vectors) == 1)


def search_text(index: Index, texts: str | Sequence[str], k: int = 10, *, model: Any = None,
                device: Any = None, **options: Any) -> Any:
    """Items that best match a text (one list) or each of several texts (a list per text)."""
    check_k(k)
    model = model or load_query_model(index, device)
    queries = encode_text_queries(model[0], texts)
    scores, ids = index.search(queries, k, **options)
    return _one_or_many(results(index, scores, ids), isinstance(texts, str))


def search_image(index: Index, images: Any, k: int = 10, *, model: Any = None, device: Any = None,
                 **options: Any) -> Any:
    """Items most like an image (a path or PIL image: one list) or each of several (a list per image)."""
    from PIL import Image

    check_k(k)
    model = model or load_query_model(index, device)
    queries = encode_image_queries(model[0], model[1], images)
    scores, ids = index.search(queries, k, **options)
    return _one_or_many(results(index, scores, ids), isinstance(images, (str, os.PathLike, Image.Image)))


def find_item(index: Index, path_or_id: int | str | os.PathLike) -> int:
    """The id of an indexed item given its id or its image path (as stored, or relative to here)."""
    if isinstance(path_or_id, (int, np.integer)) and not isinstance(path_or_id, bool):
        return index.check_id(path_or_id)
    text = os.fspath(path_or_id)
    found = index.id_of(text)
    if found is not None:
        return found
    if text.strip().isdigit():
        return index.check_id(int(text))
    raise ClipforgeError(f"'{text[:120]}' is neither an item id nor an image path in index '{index.folder}'; pass "
                         "an id or an indexed path (search by an outside image with --image)")


def more_like_this(index: Index, item: int | str | os.PathLike, k: int = 10, **options: Any) -> list[SearchResult]:
    """The k items nearest to an indexed item (by id or path), the item itself left out."""
    k, item_id = check_k(k), find_item(index, item)
    scores, ids = index.search(index.vector(item_id), k + 1, **options)
    return [hit for hit in results(index, scores, ids)[0] if hit.id != item_id][:k]


def near_duplicates(index: Index, threshold: float = 0.95, k: int = 10, *, chunk: int = DUPLICATE_CHUNK,
                    progress: bool = False, **options: Any) -> list[DuplicatePair]:
    """Pairs (i, j, score), i < j, each once, whose cosine is at least ``threshold``, best first.

    Each item's k nearest neighbours are checked, ``chunk`` items at a time through Index.search, so
    memory stays bounded at any size; with an approximate index this is fast at millions of items
    (exact scanning costs N^2 products).
    """
    k = check_k(k)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not -1 <= threshold <= 1:
        raise ClipforgeError(f"threshold must be a cosine similarity between -1 and 1, got {str(threshold)[:40]!r}")
    count = len(index)
    found_i, found_j, found_s = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc="near duplicates", unit="item")
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        queries = np.asarray(index.vectors[start:stop], dtype=np.float32)
        scores, ids = index.search(queries, k + 1, **options)
        own = np.arange(start, stop)[:, None]
        keep = (ids >= 0) & (ids != own) & (scores >= threshold)
        rows, cols = np.nonzero(keep)
        a, b = own[rows, 0], ids[rows, cols]
        found_i.append(np.minimum(a, b))
        found_j.append(np.maximum(a, b))
        found_s.append(scores[rows, cols])
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    if not found_i:
        return []
    first, second, score = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    order = np.lexsort((-score, second, first))  # by pair, best score of the two directions first
    first, second, score = first[order], second[order], score[order]
    unique = np.ones(first.size, bool)
    unique[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    first, second, score = first[unique], second[unique], score[unique]
    order = np.lexsort((second, first, -score))
    return [DuplicatePair(int(i), int(j), float(s)) for i, j, s in zip(first[order], second[order], score[order])]
