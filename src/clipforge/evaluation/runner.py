"""Run evaluations from specs ("cifar10=/data/cifar10,split=test") and write their results.

This is what ``clipforge eval`` and the training hooks call: each spec names a task, a dataset
format and where its files are; each result is a JSON file plus a printed table, and several
results make one markdown summary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import ClipforgeError
from clipforge.evaluation import report
from clipforge.evaluation.datasets import load_classification, load_retrieval
from clipforge.evaluation.features import image_features
from clipforge.evaluation.linear_probe import linear_probe
from clipforge.evaluation.retrieval import evaluate_retrieval
from clipforge.evaluation.zero_shot import evaluate_zero_shot, read_classnames, read_templates
from clipforge.models.clip import CLIP

TASKS = ("zero_shot", "linear_probe", "retrieval")


@dataclass
class EvalSpec:
    """One evaluation: ``task`` on dataset ``name`` (a format such as cifar10, imagefolder, flickr8k) at ``path``."""

    task: str
    name: str
    path: str
    split: str = "test"
    classnames: str | None = None  # file: one class name per line (or JSON)
    templates: str | None = None  # built-in set name or file
    max_samples: int | None = None  # deterministic stratified subset, for quick evals
    image_root: str | None = None  # retrieval: folder the caption file's image names are relative to
    train_split: str = "train"  # linear probe: where the probe is fitted
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ClipforgeError(f"unknown evaluation task '{self.task}'; choose one of {', '.join(TASKS)}")
        if not self.path:
            raise ClipforgeError(f"{self.task} spec for '{self.name}' needs a path: NAME=PATH")

    @property
    def label(self) -> str:
        return self.name if self.split == "test" else f"{self.name}-{self.split}"

    @classmethod
    def parse(cls, task: str, text: str) -> EvalSpec:
        """``NAME=PATH[,key=value...]``, e.g. ``imagefolder=/data/pets,classnames=pets.txt,max_samples=500``."""
        head, *options = [part.strip() for part in str(text).split(",")]
        if "=" not in head:
            raise ClipforgeError(f"--{task.replace('_', '-')} expects NAME=PATH (e.g. cifar10=/data/cifar10), "
                                 f"got {text!r}")
        name, path = head.split("=", 1)
        values: dict[str, Any] = {}
        known = {f.name for f in fields(cls)} - {"task", "name", "path", "extra"}
        for option in options:
            key, _, value = option.partition("=")
            if key not in known or not value:
                raise ClipforgeError(f"option {option!r} in {text!r} is not KEY=VALUE with KEY one of "
                                     f"{', '.join(sorted(known))}")
            values[key] = int(value) if key == "max_samples" else value
        return cls(task=task, name=name.strip(), path=path.strip(), **values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ClipforgeError(f"eval entry field '{unknown[0]}' is not known; known: {', '.join(sorted(known))}")
        return cls(**d)


def _classification(spec: EvalSpec, split: str):
    dataset = load_classification(spec.name, spec.path, split, classnames_file=spec.classnames,
                                  max_samples=spec.max_samples)
    return dataset


def _stratified_halves(labels: Sequence[int], seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint halves with each class split evenly, for datasets that ship only a test split."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    first: list[int] = []
    second: list[int] = []
    for members in by_class.values():
        order = torch.randperm(len(members), generator=generator).tolist()
        half = len(members) // 2
        first += [members[i] for i in order[:half]]
        second += [members[i] for i in order[half:]]
    return sorted(first), sorted(second)


def run_eval(spec: EvalSpec, model: CLIP, preprocess: Callable[[Any], torch.Tensor], *, model_name: str,
             batch_size: int = 128, num_workers: int = 2, precision: str = "fp32",
             cache_dir: str | os.PathLike | None = None, progress: bool = True,
             output_dir: str | os.PathLike | None = None, confusion: bool = False) -> dict[str, Any]:
    """Run one spec; write ``<output_dir>/<task>_<dataset>.json`` (and the confusion PNG) if given."""
    started = time.perf_counter()
    common = dict(batch_size=batch_size, num_workers=num_workers, precision=precision, cache_dir=cache_dir,
                  progress=progress)
    settings: dict[str, Any] = {"split": spec.split, "precision": precision, "path": str(spec.path)}
    if spec.task == "zero_shot":
        dataset = _classification(spec, spec.split)
        classnames = read_classnames(spec.classnames, spec.name) if spec.classnames else None
        templates = read_templates(spec.templates, spec.name) if spec.templates else None
        png = Path(output_dir) / f"confusion_{spec.label}.png" if confusion and output_dir else None
        metrics = evaluate_zero_shot(model, preprocess, dataset, classnames, templates, confusion_png=png, **common)
        settings["templates"] = spec.templates or "dataset default"
    elif spec.task == "retrieval":
        dataset = load_retrieval(spec.name, spec.path, spec.split, image_root=spec.image_root,
                                 max_images=spec.max_samples)
        metrics = evaluate_retrieval(model, preprocess, dataset, **common)
    else:
        metrics = _run_linear_probe(spec, model, preprocess, settings, common)
    result = report.make_result(spec.task, spec.label, model_name, metrics,
                                seconds=time.perf_counter() - started, settings=settings)
    if output_dir is not None:
        report.write_json(result, Path(output_dir) / f"{spec.task}_{spec.label}.json")
    return result


def _run_linear_probe(spec: EvalSpec, model: CLIP, preprocess, settings: dict[str, Any],
                      common: dict[str, Any]) -> dict[str, Any]:
    test = _classification(spec, spec.split)
    try:
        train = _classification(spec, spec.train_split)
        if _without_split(train.identity) == _without_split(test.identity):  # e.g. a folder with no split dirs
            raise ClipforgeError(f"'{spec.train_split}' and '{spec.split}' are the same files")
        settings["protocol"] = f"fit on '{spec.train_split}' (validation carved from it), scored on '{spec.split}'"
    except ClipforgeError as error:
        # Only a test split on disk (e.g. CIFAR-10 here): fit on one stratified half, score on the other.
        first, second = _stratified_halves(test.labels)
        train, test = test.subset(first), test.subset(second)
        settings["protocol"] = (f"no separate '{spec.train_split}' split ({error}); '{spec.split}' split halved, "
                                "stratified with seed 0: probe fitted on one half, scored on the other")
        print(f"note: {settings['protocol']}")
    train_features, train_index, skipped_train = image_features(model, train, preprocess,
                                                                 description=f"probe {spec.name} train", **common)
    test_features, test_index, skipped_test = image_features(model, test, preprocess,
                                                              description=f"probe {spec.name} test", **common)
    train_labels = torch.as_tensor(train.labels)[train_index]
    test_labels = torch.as_tensor(test.labels)[test_index]
    result = linear_probe(train_features, train_labels, test_features, test_labels, progress=common["progress"])
    metrics = {k: v for k, v in result.to_dict().items() if k != "weight"}
    metrics["num_classes"] = len(test.classnames)
    metrics["skipped"] = {"unreadable_image": skipped_train["unreadable_image"] + skipped_test["unreadable_image"]}
    return metrics


def _without_split(identity: str) -> str:
    return "|".join(part for part in identity.split("|") if not part.startswith("split="))


def run_evals(specs: Sequence[EvalSpec], model: CLIP, preprocess: Callable[[Any], torch.Tensor], *,
              model_name: str, output_dir: str | os.PathLike | None = None, quiet: bool = False,
              **kwargs: Any) -> list[dict[str, Any]]:
    """Run every spec, print each table, and write ``summary.md`` next to the JSON files."""
    results = []
    for spec in specs:
        result = run_eval(spec, model, preprocess, model_name=model_name, output_dir=output_dir, **kwargs)
        if not quiet:
            print(report.format_table(result), flush=True)
        results.append(result)
    if output_dir is not None and results:
        summary = report.markdown_summary(results)
        target = Path(output_dir) / "summary.md"
        report.atomic_write(target, lambda tmp: tmp.write_text(summary, encoding="utf-8"))
    return results
