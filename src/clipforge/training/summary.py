"""What a run says while it works and when it ends: progress, evaluation lines, the closing summary.

A bar on a terminal; in a log file (SLURM, nohup, CI) or with progress = false, one plain line
per log step, so the log shows the run is alive without a bar redrawn thousands of times.
Only the main process talks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def say(line: str) -> None:
    """print, but a closed pipe (``clipforge train ... | head``) silences the run instead of killing it."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later prints and the exit-time flush go nowhere, quietly
        os.close(devnull)


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _percent_like(metric: str) -> bool:
    return "R@" in metric or metric.startswith("top") or "recall" in metric or "acc" in metric


def format_eval(values: dict[str, float]) -> str:
    """{'eval/retrieval_flickr8k_image_to_text_R@1': 0.039, ...} -> 'flickr8k: image->text R@1 3.9%, ...'."""
    names = [key[5:] if key.startswith("eval/") else key for key in values]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind("_") + 1]  # whole words only
    label = prefix.rstrip("_")
    for task in ("retrieval_", "zero_shot_"):
        label = label.removeprefix(task)
    parts: list[str] = []
    direction = ""
    for name, value in zip(names, values.values()):
        metric = name[len(prefix):].replace("image_to_text_", "image->text ").replace("text_to_image_", "text->image ")
        shown = f"{100 * value:.1f}%" if _percent_like(metric) and 0 <= value <= 1 else f"{value:.4g}"
        head, _, rest = metric.rpartition(" ")
        if head and head == direction:  # "image->text R@1 3.9% R@5 12.0%": the direction once
            parts[-1] += f" {rest} {shown}"
        else:
            parts.append(f"{metric} {shown}")
        direction = head
    return f"{label}: {', '.join(parts)}" if label else ", ".join(parts)


class Progress:
    """The bar when stdout is a terminal and progress is on; otherwise print_step writes one line."""

    def __init__(self, total: int, initial: int, *, enabled: bool, bar: bool) -> None:
        self.total, self.initial, self.enabled = total, initial, enabled
        self.started = time.perf_counter()
        use_bar = enabled and bar and sys.stdout.isatty()
        self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train") if use_bar else None

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            say(line)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log_step(self, done: int, values: dict[str, float], skipped_total: int) -> None:
        loss, lr = values["train/loss"], values["train/lr"]
        temperature, rate = values["train/logit_scale"], values["train/samples_per_s"]
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", temp=f"{temperature:.2f}", sps=f"{rate:.0f}")
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, done - self.initial) * (self.total - done)
        skipped = f" skipped {skipped_total}" if skipped_total else ""
        self.write(f"step {done}/{self.total} loss {loss:.4f} lr {lr:.2e} temp {temperature:.2f} "
                   f"{rate:.0f} samples/s{skipped} elapsed {duration(elapsed)} eta {duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def print_summary(summary: dict[str, Any], *, last_eval: tuple[int, list[dict[str, float]]] | None,
                  elapsed: float, metrics_path: Path, headline: str = "done") -> None:
    """The closing lines: what the run did and where its results are."""
    lines: list[str] = []
    loss = summary.get("final_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, float) else "n/a (no step in this process)"
    lines.append(f"{headline}: {summary['steps']} steps ({summary['steps_this_run']} in this run, "
                 f"{duration(elapsed)}), final loss {loss_text}")
    for values in last_eval[1] if last_eval is not None else []:
        lines.append(f"  last eval (step {last_eval[0]}) {format_eval(values)}")
    skipped = summary["skipped_samples"]
    listed = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
    where = f" (see {summary['skipped_file']})" if summary.get("skipped_file") else ""
    lines.append(f"  skipped samples: {sum(skipped.values())}{': ' + listed if listed else ''}{where}; "
                 f"non-finite steps: {summary['nonfinite_steps']}")
    lines.append(f"  checkpoint: {summary['checkpoint']}")
    plot = f"curves: {summary['plot']}; " if summary.get("plot") else ""
    lines.append(f"  {plot}metrics: {metrics_path}")
    say("\n".join(lines))
