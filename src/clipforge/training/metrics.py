"""Where training metrics go: a JSONL file always, TensorBoard and Weights & Biases when asked, a PNG at the end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Only the main process writes; other ranks get a logger that does nothing.

    ``resumed_step``: the step the run continues from. TensorBoard then hides the events a killed
    run logged after it (purge_step), as metrics.jsonl is cut there (run_files.truncate_metrics),
    so no step appears twice.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, *, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None, resumed_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tensorboard = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(output_dir) / "tensorboard"
            purge = resumed_step + 1 if folder.is_dir() else None  # the first step this run logs
            self._tensorboard = SummaryWriter(str(folder), purge_step=purge)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                warnings.warn("wandb_project is set but wandb is not installed; `pip install wandb` to use it")
            else:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss, temperature and learning rate against step; eval metrics too if logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "train/loss" in r]
    if not rows:
        return None
    evals = [r for r in read_metrics(metrics_path) if any(k.startswith("eval/") for k in r)]
    panels = [("train/loss", "loss"), ("train/logit_scale", "temperature (logit scale)"), ("train/lr", "learning rate")]
    figure, axes = plt.subplots(1, len(panels) + bool(evals), figsize=(4.5 * (len(panels) + bool(evals)), 3.5))
    for axis, (key, title) in zip(axes, panels):
        axis.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
        axis.set_title(title)
        axis.set_xlabel("step")
    if evals:
        shown = {k for r in evals for k in r if k.startswith("eval/")}
        headline = {k for k in shown if not k.endswith(("top5", "mean_per_class_recall", "R@5"))}
        for key in sorted(headline or shown):
            axes[-1].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], label=key[5:])
        axes[-1].set_title("evaluation")
        axes[-1].set_xlabel("step")
        axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return Path(png_path)
