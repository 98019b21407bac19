"""``clipforge benchmark``: many evaluations, one table whose rows compare with CLIP_benchmark's ``benchmark.csv``.

Dataset names follow CLIP_benchmark: ``wds/cifar10`` is read from ``ROOT/wds_cifar10`` and ``wds/vtab/cifar10``
from ``ROOT/wds_vtab-cifar10`` (its folder slug: slashes become ``-``); ``ROOT`` may be ``hf-hub:clip-benchmark``
to download its copies. Other names are clipforge's formats read from ``ROOT/NAME`` (``imagenet``,
``imagenet-a``, ``objectnet``, ``cifar10``, ...). Values are fractions with CLIP_benchmark's column names
(acc1, acc5, mean_per_class_recall, mean_average_precision, image_retrieval_recall@k — retrieving images
from texts —, text_retrieval_recall@k). A result is reused when the model's weights, the dataset's files
and the settings are unchanged; a dataset that fails gets its error in its row and the rest goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.errors import ClipforgeError
from clipforge.evaluation import report
from clipforge.evaluation.features import model_fingerprint
from clipforge.evaluation.retrieval_data import file_fingerprint
from clipforge.evaluation.wds_benchmark import HUB_PREFIX, is_wds_name
from clipforge.models.clip import CLIP

COLUMNS = ("dataset", "model", "pretrained", "task", "language", "acc1", "acc5", "mean_per_class_recall",
           "mean_average_precision", "image_retrieval_recall@1", "image_retrieval_recall@5",
           "image_retrieval_recall@10", "text_retrieval_recall@1", "text_retrieval_recall@5",
           "text_retrieval_recall@10", "model_fullname", "seconds", "reused", "error")
_TASK_NAMES = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
_RETRIEVAL_NAMES = ("flickr8k", "flickr30k", "coco", "mscoco_captions", "flickr")


def read_dataset_list(value: str) -> list[str]:
    """Names from a comma-separated list, or from a file with one per line (``#`` comments allowed)."""
    path = Path(value).expanduser()
    if path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        names = [line.split("#", 1)[0].strip() for line in lines]
    else:
        names = [part.strip() for part in value.split(",")]
    names = [name for name in names if name]
    if not names:
        raise ClipforgeError(f"--datasets '{value}' names no dataset; give e.g. wds/cifar10,wds/imagenet1k or a file "
                             "with one name per line")
    return names


def dataset_location(name: str, root: str) -> str:
    """Where CLIP_benchmark's convention puts ``name`` under ``root``."""
    if is_wds_name(name):
        slug = "wds_" + name.split("/", 1)[1].replace("/", "-")
        return f"{root.rstrip('/')}/{slug}" if root.startswith(HUB_PREFIX) else str(Path(root).expanduser() / slug)
    return str(Path(root).expanduser() / name)


def task_of(name: str, location: str) -> str:
    """zero_shot or retrieval: a wds folder's dataset_type.txt decides (downloaded copies: by name)."""
    if is_wds_name(name):
        kind = Path(location, "dataset_type.txt")
        if not location.startswith(HUB_PREFIX) and kind.is_file():
            return "retrieval" if kind.read_text(encoding="utf-8").strip() == "retrieval" else "zero_shot"
        return "retrieval" if any(key in name.lower() for key in _RETRIEVAL_NAMES) else "zero_shot"
    return "retrieval" if name.lower() in ("flickr8k", "flickr30k", "coco") else "zero_shot"


def _files_fingerprint(location: str) -> str:
    """Names, sizes and modification times of the dataset's files (a downloaded copy: its name)."""
    if location.startswith(HUB_PREFIX):
        return location
    path = Path(location)
    if path.is_file():
        return file_fingerprint([path])
    files = []
    for parent, dirs, names in os.walk(path):
        dirs.sort()  # a stable order, so the same files give the same fingerprint
        files += [os.path.join(parent, name) for name in sorted(names)]
    return file_fingerprint(files)


def _row(name: str, task: str, model_name: str, pretrained: str, metrics: dict[str, Any], seconds: float,
         reused: bool, error: str = "") -> dict[str, Any]:
    row = {"dataset": name, "model": model_name, "pretrained": pretrained, "task": _TASK_NAMES[task],
           "language": "en", "model_fullname": f"{model_name} {pretrained}".strip(), "seconds": round(seconds, 2),
           "reused": reused, "error": error}
    for column in COLUMNS:
        if column not in row and isinstance(metrics.get(column), (int, float)):
            row[column] = float(metrics[column])
    return row


def run_benchmark(model: CLIP, preprocess: Callable[[Any], torch.Tensor], datasets: Sequence[str], root: str, *,
                  output_dir: str | os.PathLike, model_name: str, pretrained: str = "", max_samples: int | None = None,
                  evaluate: Callable[..., dict[str, Any]] | None = None, **eval_options: Any) -> list[dict[str, Any]]:
    """Evaluate every dataset (reusing unchanged results) and write benchmark.csv / benchmark.md; returns the rows."""
    from clipforge.evaluation.runner import EvalSpec, run_eval

    evaluate = evaluate or run_eval
    output = Path(output_dir)
    results_dir = output / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    weights = model_fingerprint(model)
    settings = {key: eval_options.get(key) for key in ("precision",)} | {"max_samples": max_samples}
    rows = []
    for name in datasets:
        started = time.perf_counter()
        location = dataset_location(name, root)
        task = task_of(name, location)
        slug = name.replace("/", "_")
        try:
            spec = EvalSpec(task=task, name=name, path=location, max_samples=max_samples)
            spec.check_paths()
            key = hashlib.sha1(json.dumps([weights, name, task, _files_fingerprint(location), settings],
                                          sort_keys=True).encode()).hexdigest()
            cached = results_dir / f"{slug}.json"
            previous = json.loads(cached.read_text(encoding="utf-8")) if cached.is_file() else None
            if previous is not None and previous.get("key") == key:
                rows.append(_row(name, task, model_name, pretrained, previous["metrics"], previous["seconds"], True))
                continue
            result = evaluate(spec, model, preprocess, model_name=model_name, **eval_options)
            report.write_json({**result, "key": key}, cached)
            rows.append(_row(name, task, model_name, pretrained, result["metrics"], time.perf_counter() - started,
                             False))
        except Exception as error:  # noqa: BLE001 (one dataset's failure is its row's, the rest goes on)
            message = " ".join(str(error).split())[:300] or type(error).__name__
            rows.append(_row(name, task, model_name, pretrained, {}, time.perf_counter() - started, False, message))
    write_tables(rows, output)
    from clipforge.evaluation.robustness_plot import plot_effective_robustness

    plot_effective_robustness(rows, output / "effective_robustness.png")
    return rows


def write_tables(rows: Sequence[dict[str, Any]], output: Path) -> tuple[Path, Path]:
    """benchmark.csv (CLIP_benchmark's columns, fractions) and benchmark.md (percent, failures named)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = report.atomic_write(output / "benchmark.csv", lambda tmp: tmp.write_text(text.getvalue(), "utf-8"))
    metrics = [c for c in COLUMNS[5:15] if any(c in row for row in rows)]
    lines = ["| " + " | ".join(["dataset", "task", *metrics, "note"]) + " |",
             "|---|---|" + "---:|" * len(metrics) + "---|"]
    for row in rows:
        values = [f"{100 * row[c]:.2f}" if c in row else "" for c in metrics]
        note = f"failed: {row['error']}" if row["error"] else ("reused" if row["reused"] else "")
        lines.append("| " + " | ".join([row["dataset"], row["task"], *values, note]) + " |")
    markdown = f"Model: {rows[0]['model_fullname'] if rows else ''} (values in %)\n\n" + "\n".join(lines) + "\n"
    md_path = report.atomic_write(output / "benchmark.md", lambda tmp: tmp.write_text(markdown, "utf-8"))
    return csv_path, md_path
