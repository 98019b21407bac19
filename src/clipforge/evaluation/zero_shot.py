"""Zero-shot classifiers from class names and prompt templates, ensembled as in the paper.

Each class's text embeddings over all templates are L2-normalised, averaged and renormalised;
the classifier is the [embed_dim, classes] matrix of those means. Images are assigned the class
whose embedding has the highest cosine similarity (the logit scale does not change the ranking).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.errors import ClipforgeError
from clipforge.evaluation.features import image_features, text_features
from clipforge.evaluation.metrics import classification_metrics, clip_benchmark_names
from clipforge.evaluation.retrieval_data import read_text, short
from clipforge.models.clip import CLIP


@lru_cache(maxsize=None)
def _template_sets() -> dict[str, tuple[str, ...]]:
    data = json.loads((resources.files("clipforge.evaluation") / "templates.json").read_text(encoding="utf-8"))
    return {name: tuple(items) for name, items in data.items() if not name.startswith("_")}


def get_templates(name: str) -> list[str]:
    """A built-in template set: 'imagenet' (the paper's 80 prompts), 'simple' (its 7-prompt subset),
    or a dataset's own prompts (e.g. 'cifar10', as in OpenAI's prompts.md and CLIP_benchmark)."""
    sets = _template_sets()
    if name in sets:
        return list(sets[name])
    from clipforge.evaluation.datasets import dataset_templates

    own = dataset_templates(name)
    if own:
        return own
    raise ClipforgeError(f"unknown template set '{name}'; choose one of {', '.join(sets)}, a dataset name, "
                         "or pass a file (one template per line, or JSON)")


def normalize_template(template: str) -> str:
    """Accept CLIP_benchmark's '{c}' placeholder as well as '{}'."""
    template = template.replace("{c}", "{}")
    if "{}" not in template:
        raise ClipforgeError(f"prompt template {short(template)!r} has no '{{}}' (or '{{c}}') where the class "
                             "name goes; add it")
    return template


def _json(text: str, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ClipforgeError(f"{what} '{short(path)}' is not valid JSON ({error}); fix it or give one entry "
                             "per line in a .txt file") from None


def _keyed(data: Any, path: Path, what: str, dataset: str | None) -> Any:
    """A JSON object keyed by dataset name (CLIP_benchmark's files) gives the entry for ``dataset``."""
    if not isinstance(data, dict):
        return data
    if dataset is None or dataset not in data:
        keys = ", ".join(short(k, 40) for k in list(data)[:10]) or "none"
        raise ClipforgeError(f"{what} '{short(path)}' is keyed by dataset but has no key '{short(dataset, 40)}'; "
                             f"its keys: {keys}")
    return data[dataset]


def read_templates(source: str | os.PathLike, dataset: str | None = None) -> list[str]:
    """Templates from a built-in set name or a file: one per line, a JSON list, or a JSON object
    keyed by dataset name (CLIP_benchmark's ``--custom_template_file`` format)."""
    path = Path(source)
    if not path.is_file():
        if os.sep in str(source) or path.suffix or path.exists():
            raise ClipforgeError(f"templates file '{short(source)}' does not exist (or is not a file); pass a "
                                 "text file with one template per line, or a built-in set such as imagenet")
        return get_templates(str(source))
    text = read_text(path, "templates file")
    if path.suffix.lower() == ".json":
        data = _keyed(_json(text, path, "templates file"), path, "templates file", dataset)
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise ClipforgeError(f"templates file '{short(path)}' must hold a JSON list of strings")
        templates = data
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip()]
    if not templates:
        raise ClipforgeError(f"templates file '{short(path)}' holds no template; write one per line, with {{}} "
                             "where the class name goes")
    return [normalize_template(t) for t in templates]


def read_classnames(path: str | os.PathLike, dataset: str | None = None) -> list[str]:
    """Class names from a file: one per line, a JSON list, or a JSON object keyed by dataset name."""
    path = Path(path)
    if not path.is_file():
        raise ClipforgeError(f"class names file '{short(path)}' does not exist (or is not a file); pass a text file "
                             "with one class name per line")
    text = read_text(path, "class names file")
    if path.suffix.lower() == ".json":
        data = _keyed(_json(text, path, "class names file"), path, "class names file", dataset)
        if not isinstance(data, list) or not all(isinstance(n, (str, int, float)) for n in data):
            raise ClipforgeError(f"class names file '{short(path)}' must hold a JSON list of names")
        names = [str(n) for n in data]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ClipforgeError(f"class names file '{short(path)}' holds no name; write one class name per line")
    return names


@torch.no_grad()
def build_zero_shot_classifier(model: CLIP, classnames: Sequence[str], templates: Sequence[str],
                               batch_size: int = 256, precision: str = "fp32") -> torch.Tensor:
    """[embed_dim, len(classnames)] matrix of ensembled, normalised class embeddings."""
    if not classnames:
        raise ClipforgeError("no class names given; pass at least one label")
    templates = [normalize_template(t) for t in templates] or ["{}"]
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    features = text_features(model, prompts, batch_size=batch_size, precision=precision)
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    device = next(model.parameters()).device
    return F.normalize(per_class, dim=-1).t().to(device)


def zero_shot_scores(model: CLIP, image_embeddings: torch.Tensor, classnames: Sequence[str],
                     templates: Sequence[str], precision: str = "fp32") -> torch.Tensor:
    """[N, C] class scores of L2-normalised image embeddings: cosine with the prompt-ensemble classifier,
    or, for a model trained with a predictive objective, the prompts' likelihood (predictive_zero_shot.py)."""
    if model.config.predictive_head is not None:
        from clipforge.evaluation.predictive_zero_shot import predictive_scores

        return predictive_scores(model, image_embeddings, classnames, templates)
    return image_embeddings @ build_zero_shot_classifier(model, classnames, templates, precision=precision).float().cpu()


@torch.no_grad()
def evaluate_zero_shot(model: CLIP, preprocess: Callable[[Any], torch.Tensor], dataset,
                       classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None, *,
                       batch_size: int = 128, num_workers: int = 2, precision: str = "fp32",
                       cache_dir: str | os.PathLike | None = None, progress: bool = True,
                       confusion_png: str | os.PathLike | None = None) -> dict[str, Any]:
    """Top-1, top-5 and mean per-class recall of the prompt-ensemble classifier on ``dataset``.

    ``dataset`` yields (image, label) and has ``labels`` and ``classnames``; class names and
    templates default to the dataset's own (``'{}'`` alone when it has none).
    """
    classnames = list(classnames or dataset.classnames)
    if templates is None:
        from clipforge.evaluation.datasets import dataset_templates

        templates = dataset_templates(getattr(dataset, "name", "")) or ["{}"]
    if not classnames:
        raise ClipforgeError("no class names given; pass at least one label")
    skipped_files: list[dict[str, Any]] = []
    features, indices, skipped = image_features(model, dataset, preprocess, batch_size=batch_size,
                                                num_workers=num_workers, precision=precision,
                                                cache_dir=cache_dir, progress=progress,
                                                description=f"zero-shot {getattr(dataset, 'name', '')}",
                                                skipped_items=skipped_files)
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)[indices]
    if labels.numel() and int(labels.max()) >= len(classnames):
        raise ClipforgeError(f"the dataset has label {int(labels.max())} but only {len(classnames)} class names "
                             "were given")
    scores = zero_shot_scores(model, features, classnames, templates, precision)
    metrics = classification_metrics(scores, labels, len(classnames))
    confusion = metrics.pop("confusion")
    if confusion_png is not None:
        from clipforge.evaluation.report import plot_confusion

        plot_confusion(confusion, classnames, confusion_png)
    return {**metrics, **clip_benchmark_names(metrics), "num_templates": len(templates), "skipped": skipped,
            "skipped_files": skipped_files}
