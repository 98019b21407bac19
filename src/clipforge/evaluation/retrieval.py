"""Zero-shot image-text retrieval: Recall@K both ways over a set of images with several captions each."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from clipforge.errors import ClipforgeError
from clipforge.evaluation.features import image_features, text_features
from clipforge.evaluation.metrics import clip_benchmark_names, retrieval_metrics
from clipforge.models.clip import CLIP


def evaluate_retrieval(model: CLIP, preprocess: Callable[[Any], torch.Tensor], dataset, *,
                       ks: Sequence[int] = (1, 5, 10), batch_size: int = 128, num_workers: int = 2,
                       precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """R@k image->text and text->image on ``dataset`` (items: image, list of captions; has ``captions``).

    Images that cannot be decoded are skipped and counted; their captions leave the pool too, so
    every remaining caption has its image among the candidates.
    """
    captions: list[list[str]] = dataset.captions
    if not any(captions):
        raise ClipforgeError("the retrieval dataset has no captions")
    skipped_files: list[dict[str, Any]] = []
    images, kept, skipped = image_features(model, dataset, preprocess, batch_size=batch_size,
                                           num_workers=num_workers, precision=precision, cache_dir=cache_dir,
                                           progress=progress,
                                           description=f"retrieval {getattr(dataset, 'name', '')} images",
                                           skipped_items=skipped_files)
    texts: list[str] = []
    owners: list[int] = []
    for position, index in enumerate(kept.tolist()):
        texts.extend(captions[index])
        owners.extend([position] * len(captions[index]))
    texts_embedded = text_features(model, texts, precision=precision, progress=progress,
                                   description=f"retrieval {getattr(dataset, 'name', '')} captions")
    metrics = retrieval_metrics(images, texts_embedded, torch.tensor(owners), ks=ks)
    return {**metrics, **clip_benchmark_names(metrics), "num_images": len(images), "num_captions": len(texts),
            "skipped": skipped, "skipped_files": skipped_files}
