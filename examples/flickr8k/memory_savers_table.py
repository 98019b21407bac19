"""Table of memory_savers.sh: final training loss and held-out Flickr8k retrieval per run, and the seed spread.

Usage: python examples/flickr8k/memory_savers_table.py runs/memory-savers
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarise(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    evals = [row for row in rows if any(key.startswith("eval/") for key in row)]
    last = evals[-1] if evals else {}
    recall = {key.split("_", 2)[-1]: value for key, value in last.items() if key.startswith("eval/")}
    mean_r = statistics.fmean(recall.values()) if recall else float("nan")
    return {"steps": rows[-1]["step"], "loss (mean of last 3 logs)": statistics.fmean(losses[-3:]),
            "mean R@1/5/10 both ways": mean_r,
            "i2t R@1": last.get("eval/retrieval_flickr8k-val_image_to_text_R@1", float("nan")),
            "t2i R@1": last.get("eval/retrieval_flickr8k-val_text_to_image_R@1", float("nan"))}


def main(root: Path) -> None:
    runs = {run.name: summarise(run) for run in sorted(root.iterdir()) if (run / "metrics.jsonl").is_file()}
    columns = list(next(iter(runs.values())))
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, values in runs.items():
        print(f"| {name} | " + " | ".join(f"{values[c]:.4f}" if c != "steps" else str(values[c]) for c in columns)
              + " |")
    for mode in sorted({name.split("-seed")[0] for name in runs}):
        seeds = [values for name, values in runs.items() if name.startswith(mode + "-seed")]
        if len(seeds) > 1:
            low = {c: min(v[c] for v in seeds) for c in columns[1:]}
            high = {c: max(v[c] for v in seeds) for c in columns[1:]}
            print(f"| {mode}: range over {len(seeds)} seeds | | "
                  + " | ".join(f"{low[c]:.4f} to {high[c]:.4f}" for c in columns[1:]) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/memory-savers"))
