"""The paper's robustness picture (its Figure 13, after Taori et al. 2020): accuracy under distribution shift
against ImageNet accuracy, one point per model and shifted set, on logit-scaled axes with the y = x line
that a perfectly robust model would sit on. Effective robustness is a model's height above the line
that models trained on ImageNet follow; without such a fitted baseline the plot shows the y = x line and
each point's gap to it is printed in the legend (shifted minus ImageNet top-1)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

SHIFTS = ("imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r", "objectnet")
_MARKERS = dict(zip(SHIFTS, "osv^D"))


def _dataset_key(name: str) -> str:
    """'wds/imagenet-a', 'wds/imagenetv2', 'ImageNet_A' -> the shift's key, or the name lower-cased."""
    key = name.lower().removeprefix("wds/").replace("_", "-")
    return {"imagenetv2": "imagenet-v2", "imagenet1k": "imagenet", "imagenet-1k": "imagenet",
            "imagenet-o": "imagenet-o"}.get(key, key)


def robustness_points(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """model -> {"imagenet": top-1, shift: top-1, ...} from benchmark rows (fractions; rows without acc1 ignored)."""
    points: dict[str, dict[str, float]] = {}
    for row in rows:
        value = row.get("acc1")
        if value in (None, "") or row.get("error"):
            continue
        key = _dataset_key(str(row.get("dataset", "")))
        if key == "imagenet" or key in SHIFTS:
            points.setdefault(str(row.get("model_fullname") or row.get("model")), {})[key] = float(value)
    return {model: values for model, values in points.items() if "imagenet" in values and len(values) > 1}


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def plot_effective_robustness(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Write the PNG; None (and no file) when no model has ImageNet and a shifted set in ``rows``."""
    points = robustness_points(rows)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 5.2))
    ticks = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    for model, values in sorted(points.items()):
        x = _logit(values["imagenet"])
        for shift in SHIFTS:
            if shift in values:
                gap = values[shift] - values["imagenet"]
                axes.scatter([x], [_logit(values[shift])], marker=_MARKERS[shift], s=46,
                             label=f"{model}: {shift} ({gap * 100:+.1f} pts)")
    axes.plot([_logit(ticks[0]), _logit(ticks[-1])], [_logit(ticks[0]), _logit(ticks[-1])], "k--", lw=1,
              label="y = x (perfectly robust)")
    axes.set_xticks([_logit(t) for t in ticks], [f"{t:.0%}" for t in ticks])
    axes.set_yticks([_logit(t) for t in ticks], [f"{t:.0%}" for t in ticks])
    axes.set_xlabel("ImageNet top-1 (logit scale)")
    axes.set_ylabel("top-1 under distribution shift (logit scale)")
    axes.set_title("Robustness to natural distribution shift")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
