"""Evaluation results people can use: one JSON file per eval, a printed table, a markdown summary."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.atomic import atomic_write

#: The headline numbers of each task, in the order tables show them.
HEADLINE = {
    "zero_shot": ("top1", "top5", "mean_per_class_recall", "mean_average_precision"),
    "linear_probe": ("accuracy", "mean_per_class_recall", "best_l2"),
    "retrieval": ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
                  "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10"),
}
_OPTIONAL = {"mean_average_precision"}  # multilabel only: no column unless a result has it


def chance_levels(task: str, result: dict[str, Any]) -> dict[str, float]:
    """What a model that knows nothing scores, next to each headline metric."""
    metrics = result["metrics"]
    if "mean_average_precision" in metrics:  # multilabel: chance depends on each class's share of positives
        return {}
    if task in ("zero_shot", "linear_probe"):
        classes = metrics.get("num_classes") or 0
        levels = {"top1": 1 / classes, "accuracy": 1 / classes, "mean_per_class_recall": 1 / classes} if classes \
            else {}
        if classes >= 5:
            levels["top5"] = 5 / classes
        return levels
    if task == "retrieval":
        images, captions = metrics["num_images"], metrics["num_captions"]
        per_image = captions / max(images, 1)
        levels = {}
        for key in HEADLINE["retrieval"]:
            k = int(key.rsplit("@", 1)[1])
            if key.startswith("image_to_text"):  # P(at least one of ~per_image captions in k random picks)
                levels[key] = 1 - _miss_all(captions, round(per_image), k)
            else:
                levels[key] = min(k, images) / images
        return levels
    return {}


def _miss_all(total: int, positives: int, k: int) -> float:
    probability = 1.0
    for i in range(min(k, total)):
        probability *= max(total - positives - i, 0) / (total - i)
    return probability


def make_result(task: str, dataset: str, model: str, metrics: dict[str, Any], *, seconds: float,
                settings: dict[str, Any] | None = None) -> dict[str, Any]:
    result = {"task": task, "dataset": dataset, "model": model, "metrics": metrics,
              "settings": settings or {}, "seconds": round(seconds, 2),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    result["chance"] = chance_levels(task, result)
    return result


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    text = json.dumps(result, indent=2, default=float) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fmt(key: str, value: Any) -> str:
    if key == "best_l2":
        return f"{value:.3g}"
    return f"{100 * value:.2f}" if isinstance(value, float) else str(value)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of one result's headline metrics with chance levels."""
    rows = [(key, _fmt(key, result["metrics"][key]), _fmt(key, result["chance"][key]) if key in result["chance"]
             else "") for key in HEADLINE.get(result["task"], ()) if key in result["metrics"]]
    title = f"{result['task']} on {result['dataset']} ({result['model']})"
    width = max((len(r[0]) for r in rows), default=10)
    lines = [title, f"{'metric':<{width}}  {'value %':>8}  {'chance %':>8}"]
    lines += [f"{k:<{width}}  {v:>8}  {c:>8}" for k, v, c in rows]
    return "\n".join(lines)


def markdown_summary(results: Sequence[dict[str, Any]]) -> str:
    """One markdown table per task over every dataset evaluated, values in % with chance in brackets."""
    lines = []
    for task, keys in HEADLINE.items():
        mine = [r for r in results if r["task"] == task]
        if not mine:
            continue
        keys = tuple(k for k in keys if k not in _OPTIONAL or any(k in r["metrics"] for r in mine))
        lines += [f"### {task.replace('_', ' ')}", "", "| model | dataset | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for r in mine:
            cells = [f"{_fmt(k, r['metrics'][k])} ({_fmt(k, r['chance'][k])})" if k in r["chance"]
                     else _fmt(k, r["metrics"].get(k, "")) for k in keys]
            lines.append(f"| {r['model']} | {r['dataset']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Values in %; chance level in brackets.")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: torch.Tensor, classnames: Sequence[str], path: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.35 * len(classnames) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classnames) <= 40:
        axes.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=7)
        axes.set_yticks(range(len(classnames)), classnames, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return target
