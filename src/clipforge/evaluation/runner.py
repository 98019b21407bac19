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
from clipforge.evaluation.datasets import _ALIASES, CLASSIFICATION_FORMATS, load_classification, load_retrieval
from clipforge.evaluation.features import image_features, reason_counts
from clipforge.evaluation.few_shot import few_shot_probe, parse_shots
from clipforge.evaluation.linear_probe import linear_probe
from clipforge.evaluation.retrieval import evaluate_retrieval
from clipforge.evaluation.retrieval_data import _SPLITS, RETRIEVAL_FORMATS, short
from clipforge.evaluation.wds_benchmark import HUB_PREFIX, is_wds_name
from clipforge.evaluation.zero_shot import evaluate_zero_shot, read_classnames, read_templates
from clipforge.models.clip import CLIP

TASKS = ("zero_shot", "linear_probe", "retrieval")
_RETRIEVAL_SPLITS = tuple(_SPLITS)


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
    image_column: str = "filepath"  # csv classification: the column of image paths
    label_column: str = "label"  # csv classification: the column of labels
    shots: str | None = None  # linear probe: also k-shot probes for these k, joined by '+', e.g. "1+2+4+8+16"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("max_samples", "extra") and value is not None and not isinstance(value, str):
                raise ClipforgeError(f"eval spec field '{f.name}' must be text, got {short(repr(value), 40)}")
        if self.task not in TASKS:
            raise ClipforgeError(f"unknown evaluation task '{short(self.task, 40)}'; choose one of {', '.join(TASKS)}")
        if not self.name:
            raise ClipforgeError(f"{self.task} spec needs a dataset format before '=': NAME=PATH, e.g. "
                                 "cifar10=/data/cifar10")
        if not self.path:
            raise ClipforgeError(f"{self.task} spec for '{short(self.name, 40)}' needs a path: NAME=PATH")
        if self.max_samples is not None and (isinstance(self.max_samples, bool)
                                             or not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ClipforgeError(f"max_samples of the {self.task} spec for '{short(self.name, 40)}' must be a "
                                 f"positive whole number, got {short(repr(self.max_samples), 40)}")
        if self.shots is not None:
            if self.task != "linear_probe":
                raise ClipforgeError(f"shots= applies to linear probes only, not to the {self.task} spec "
                                     f"for '{short(self.name, 40)}'")
            parse_shots(self.shots)
        splits = _RETRIEVAL_SPLITS if self.task == "retrieval" else ("train", "test")
        for key in ("split", "train_split"):
            if getattr(self, key) not in splits:
                raise ClipforgeError(f"{key} '{short(getattr(self, key), 40)}' of the {self.task} spec for "
                                     f"'{short(self.name, 40)}' is not a split it has; choose one of {', '.join(splits)}")
        formats = RETRIEVAL_FORMATS if self.task == "retrieval" else CLASSIFICATION_FORMATS
        aliases = () if self.task == "retrieval" else tuple(_ALIASES)
        if self.name.lower() not in (*formats, *aliases) and not is_wds_name(self.name):
            raise ClipforgeError(f"unknown {self.task.replace('_', '-')} dataset format '{short(self.name, 40)}'; "
                                 f"choose one of {', '.join(formats)}, or wds/NAME for a CLIP_benchmark "
                                 "WebDataset folder")

    @property
    def label(self) -> str:
        name = self.name.replace("/", "_")  # wds/cifar10 -> wds_cifar10 (CLIP_benchmark's slug): a file name
        return name if self.split == "test" else f"{name}-{self.split}"

    @classmethod
    def parse(cls, task: str, text: str) -> EvalSpec:
        """``NAME=PATH[,key=value...]``, e.g. ``imagefolder=/data/pets,classnames=pets.txt,max_samples=500``."""
        option = f"--{task.replace('_', '-')}"
        head, *options = [part.strip() for part in str(text).split(",")]
        if "=" not in head:
            raise ClipforgeError(f"{option} expects NAME=PATH (e.g. cifar10=/data/cifar10), got {short(text)!r}")
        name, path = head.split("=", 1)
        values: dict[str, Any] = {}
        known = sorted({f.name for f in fields(cls)} - {"task", "name", "path", "extra"})
        for item in options:
            key, equals, value = (part.strip() for part in item.partition("="))
            if key not in known or not equals or not value:
                raise ClipforgeError(f"{option} option {short(item, 60)!r} is not KEY=VALUE with KEY one of "
                                     f"{', '.join(known)}; fix {short(text, 100)!r}")
            if key in values:
                raise ClipforgeError(f"{option} gives {key}= twice in {short(text)!r}; keep one")
            values[key] = _whole_number(value, f"{option} option max_samples") if key == "max_samples" else value
        return cls(task=task, name=name.strip(), path=path.strip(), **values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ClipforgeError(f"eval entry field '{short(unknown[0], 40)}' is not known; known: "
                                 f"{', '.join(sorted(known))}")
        missing = sorted({"task", "name", "path"} - set(d))
        if missing:
            raise ClipforgeError(f"eval entry lacks field(s) {', '.join(missing)}; give task, name and path")
        return cls(**d)

    def check_paths(self) -> None:
        """Fail now, before a model is loaded, if a path this spec names does not exist."""
        for key, value in (("path", self.path), ("classnames", self.classnames), ("image_root", self.image_root)):
            if key == "path" and is_wds_name(self.name) and value.startswith(HUB_PREFIX):
                continue  # downloaded when the eval runs
            if value is not None and not os.path.lexists(Path(value).expanduser()):
                raise ClipforgeError(f"{self.task} spec '{short(self.name, 40)}': {key} '{short(value)}' does not "
                                     "exist; check the path")
        if self.templates is not None and Path(self.templates).suffix and not Path(self.templates).exists():
            raise ClipforgeError(f"{self.task} spec templates= '{short(self.templates)}' does not exist; pass a "
                                 "file or a built-in set such as imagenet")


def _whole_number(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ClipforgeError(f"{what} must be a positive whole number, got {short(value, 40)!r}") from None
    if number < 1:
        raise ClipforgeError(f"{what} must be a positive whole number, got {number}; leave it out to use "
                             "every sample")
    return number


def _classification(spec: EvalSpec, split: str):
    if is_wds_name(spec.name):
        from clipforge.evaluation.wds_eval import load_wds_classification

        return load_wds_classification(spec, split)
    dataset = load_classification(spec.name, spec.path, split, classnames_file=spec.classnames,
                                  max_samples=spec.max_samples, image_column=spec.image_column,
                                  label_column=spec.label_column)
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
    if is_wds_name(spec.name) and spec.task != "linear_probe":
        from clipforge.evaluation.wds_eval import evaluate_wds

        png = Path(output_dir) / f"confusion_{spec.label}.png" if confusion and output_dir else None
        metrics = evaluate_wds(spec, model, preprocess, common, settings, confusion_png=png)
    elif spec.task == "zero_shot":
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
    skipped_files = metrics.pop("skipped_files", [])
    result = report.make_result(spec.task, spec.label, model_name, metrics,
                                seconds=time.perf_counter() - started, settings=settings)
    result["skipped_files"] = skipped_files  # every image left out, with its reason and error
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
    skipped_files: list[dict[str, Any]] = []
    train_features, train_index, _ = image_features(model, train, preprocess, description=f"probe {spec.name} train",
                                                    skipped_items=skipped_files, **common)
    test_features, test_index, _ = image_features(model, test, preprocess, description=f"probe {spec.name} test",
                                                  skipped_items=skipped_files, **common)
    train_labels = torch.as_tensor(train.labels)[train_index]
    test_labels = torch.as_tensor(test.labels)[test_index]
    result = linear_probe(train_features, train_labels, test_features, test_labels, progress=common["progress"])
    metrics = {k: v for k, v in result.to_dict().items() if k != "weight"}
    if spec.shots is not None:  # the paper's k-shot probes on the same features, 3 seeds each
        metrics["few_shot"] = few_shot_probe(train_features, train_labels, test_features, test_labels,
                                             shots=parse_shots(spec.shots))
    metrics["num_classes"] = len(test.classnames)
    metrics["skipped"] = reason_counts(skipped_files)
    metrics["skipped_files"] = skipped_files
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
