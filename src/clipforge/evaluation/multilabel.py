"""Zero-shot multilabel classification scored by mean average precision, exactly as CLIP_benchmark computes it.

CLIP_benchmark (``metrics/zeroshot_classification.average_precision_per_class``, from torchnet's meter) ranks
the images by each class's score and averages the precision at every positive; a class with no positive image
scores 0 and still counts in the mean. The prompt-ensemble classifier is the same as for single-label zero-shot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from clipforge.errors import ClipforgeError
from clipforge.evaluation.features import image_features
from clipforge.evaluation.zero_shot import zero_shot_scores
from clipforge.models.clip import CLIP


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[C] average precision of each class from scores [N, C] and 0/1 targets [N, C] (CLIP_benchmark's formula)."""
    ap = torch.zeros(scores.size(1))
    ranks = torch.arange(1, scores.size(0) + 1).float()
    for k in range(scores.size(1)):
        order = torch.sort(scores[:, k], 0, True)[1]
        truth = targets[:, k][order]
        precision = truth.float().cumsum(0).div(ranks)
        ap[k] = precision[truth.bool()].sum() / max(float(truth.sum()), 1)
    return ap


def evaluate_multilabel(model: CLIP, preprocess: Callable[[Any], torch.Tensor], dataset,
                        classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None, *,
                        batch_size: int = 128, num_workers: int = 2, precision: str = "fp32",
                        cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Mean average precision (and each class's AP) of the zero-shot classifier on a multilabel dataset.

    ``dataset`` yields (image, target vector) and has ``labels`` (one vector per item) and ``classnames``.
    """
    classnames = list(classnames or dataset.classnames)
    templates = list(templates or ["{}"])
    if not classnames:
        raise ClipforgeError("no class names given; pass at least one label")
    skipped_files: list[dict[str, Any]] = []
    features, indices, skipped = image_features(model, dataset, preprocess, batch_size=batch_size,
                                                num_workers=num_workers, precision=precision, cache_dir=cache_dir,
                                                progress=progress,
                                                description=f"multilabel {getattr(dataset, 'name', '')}",
                                                skipped_items=skipped_files)
    targets = torch.from_numpy(np.stack([np.asarray(dataset.labels[i]) for i in indices.tolist()]))
    if targets.shape[1] != len(classnames):
        raise ClipforgeError(f"the dataset's label vectors have {targets.shape[1]} entries but {len(classnames)} "
                             "class names were given; give one name per vector entry")
    per_class = average_precision_per_class(zero_shot_scores(model, features, classnames, templates, precision),
                                            targets)
    return {"mean_average_precision": per_class.mean().item(), "num_samples": len(targets),
            "num_classes": len(classnames), "num_templates": len(templates),
            "average_precision_per_class": per_class.tolist(),  # in class-name order
            "skipped": skipped, "skipped_files": skipped_files}
