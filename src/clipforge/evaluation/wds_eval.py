"""Run an EvalSpec on a CLIP_benchmark WebDataset copy (``wds/NAME=FOLDER`` or ``wds/NAME=hf-hub:ORG/REPO``).

The folder's ``dataset_type.txt`` picks what is measured, as in CLIP_benchmark: zero-shot top-1/top-5/mean
per-class recall for classification, mean average precision for multilabel, Recall@k for retrieval. Class names
and templates come from the folder's text files unless the spec's ``classnames=`` / ``templates=`` override them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from clipforge.errors import ClipforgeError
from clipforge.evaluation.datasets import ClassificationDataset
from clipforge.evaluation.multilabel import evaluate_multilabel
from clipforge.evaluation.retrieval import evaluate_retrieval
from clipforge.evaluation.retrieval_data import short
from clipforge.evaluation.wds_benchmark import WdsInfo, load_wds
from clipforge.evaluation.zero_shot import evaluate_zero_shot, normalize_template, read_classnames, read_templates
from clipforge.models.clip import CLIP

_TASK_OF_TYPE = {"classification": "zero_shot", "multilabel": "zero_shot", "retrieval": "retrieval"}


def _load(spec, split: str) -> tuple[WdsInfo, Any]:
    classnames = read_classnames(spec.classnames, spec.name) if spec.classnames else None
    return load_wds(spec.name, spec.path, split, max_samples=spec.max_samples, classnames=classnames)


def _templates(spec, info: WdsInfo) -> list[str]:
    if spec.templates:
        return read_templates(spec.templates, spec.name)
    if not info.templates:
        raise ClipforgeError(f"'{short(info.root)}' has no zeroshot_classification_templates.txt; add one template "
                             "per line with {c} where the class name goes, or pass templates=")
    return [normalize_template(t) for t in info.templates]


def load_wds_classification(spec, split: str) -> ClassificationDataset:
    """A single-label split for the linear probe; other dataset types cannot be probed."""
    info, dataset = _load(spec, split)
    if info.dataset_type != "classification":
        option = "--" + _TASK_OF_TYPE[info.dataset_type].replace("_", "-")
        raise ClipforgeError(f"'{short(spec.path)}' is a {info.dataset_type} dataset (dataset_type.txt), which a "
                             f"linear probe cannot use; pass it with {option}")
    return dataset


def evaluate_wds(spec, model: CLIP, preprocess: Callable[[Any], torch.Tensor], common: dict[str, Any],
                 settings: dict[str, Any], confusion_png: str | os.PathLike | None = None) -> dict[str, Any]:
    """Metrics of ``spec`` (task zero_shot or retrieval) on the WebDataset copy it names."""
    info, dataset = _load(spec, spec.split)
    expected = _TASK_OF_TYPE[info.dataset_type]
    if spec.task != expected:
        raise ClipforgeError(f"'{short(spec.path)}' is a {info.dataset_type} dataset (dataset_type.txt); pass it "
                             f"with --{expected.replace('_', '-')} instead of --{spec.task.replace('_', '-')}")
    settings["dataset_type"] = info.dataset_type
    if info.dataset_type == "retrieval":
        return evaluate_retrieval(model, preprocess, dataset, **common)
    templates = _templates(spec, info)
    settings["templates"] = spec.templates or "zeroshot_classification_templates.txt"
    if info.dataset_type == "multilabel":
        return evaluate_multilabel(model, preprocess, dataset, templates=templates, **common)
    return evaluate_zero_shot(model, preprocess, dataset, templates=templates, confusion_png=confusion_png, **common)
