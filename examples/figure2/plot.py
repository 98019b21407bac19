"""Figure 2 at small scale: zero-shot accuracy against images processed, one curve per objective.

Reads ``RUNS/<objective>-seed<N>/metrics.jsonl`` written by ``examples/figure2/run.sh`` and writes
``OUT.png`` (mean over seeds, the band spans the seeds) and ``OUT.md``: each objective's accuracy,
its training FLOPs per image, and the efficiency ratios at equal accuracy next to the paper's 3x and 4x.

    python examples/figure2/plot.py runs/figure2 --out docs/figure2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OBJECTIVES = {"contrastive": "Contrastive (CLIP)", "bow_prediction": "Bag of words prediction",
              "caption_lm": "Transformer language model"}
METRIC = "eval/synthetic_zero_shot_top1"
CHANCE = 1 / 28
PAPER = {("caption_lm", "bow_prediction"): 3.0, ("bow_prediction", "contrastive"): 4.0,
         ("caption_lm", "contrastive"): 12.0}


def curves(runs: Path, batch: int) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """objective -> seed -> [(images processed, top-1)] (with chance at 0 images)."""
    out: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for folder in sorted(runs.glob("*-seed*")):
        objective, seed = folder.name.rsplit("-seed", 1)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        points = [(0, CHANCE)] + [(row["step"] * batch, row[METRIC]) for row in rows if METRIC in row]
        out.setdefault(objective, {})[int(seed)] = points
    return out


def images_to_reach(points: list[tuple[int, float]], level: float) -> float | None:
    """Images processed when the curve first reaches ``level`` (linear between evaluations), or None."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= level:
            return x0 + (x1 - x0) * (level - y0) / (y1 - y0) if y1 > y0 else x1
    return None


def flops_per_image(model: str, captions: list[str]) -> dict[str, float]:
    """Training FLOPs per image (3 x forward) of each objective, from the analytic counts of bench/flops.py."""
    import clipforge
    from clipforge.bench.flops import image_flops, text_flops

    config = clipforge.get_model_config(model)
    ids = clipforge.tokenize(captions, context_length=config.text.context_length, truncate=True)
    tokens = float((ids.argmax(dim=-1) + 1).float().mean())
    image, text, width, vocab = image_flops(config), text_flops(config, round(tokens)), config.text.width, config.text.vocab_size
    return {"contrastive": 3 * (image + text),
            "bow_prediction": 3 * (image + 2 * config.embed_dim * vocab),
            "caption_lm": 3 * (image + text + tokens * 2 * width * vocab), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/figure2"))
    parser.add_argument("--batch", type=int, default=64, help="global batch size of the runs")
    parser.add_argument("--model", default="ViT-Tiny-32")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipforge.data.synthetic import synthetic_pair

    data = curves(args.runs, args.batch)
    flops = flops_per_image(args.model, [synthetic_pair(0, i)[1] for i in range(2000)])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {"contrastive": "tab:orange", "bow_prediction": "tab:green", "caption_lm": "tab:blue"}
    summary = {}
    for objective, label in OBJECTIVES.items():
        seeds = data.get(objective)
        if not seeds:
            continue
        xs = np.array([x for x, _ in next(iter(seeds.values()))])
        ys = np.array([[y for _, y in points] for points in seeds.values()])
        ax.plot(xs, ys.mean(axis=0) * 100, label=label, color=colours[objective], marker="o", ms=3)
        ax.fill_between(xs, ys.min(axis=0) * 100, ys.max(axis=0) * 100, color=colours[objective], alpha=0.2)
        summary[objective] = {"final": [float(y[-1]) for y in ys], "seeds": len(seeds),
                              "curve": list(zip(xs.tolist(), ys.mean(axis=0).tolist()))}
    ax.axhline(CHANCE * 100, color="grey", lw=0.8, ls="--", label="chance (1/28)")
    ax.set_xlabel("# of images processed")
    ax.set_ylabel("zero-shot accuracy, 28 colour+shape classes (%)")
    ax.set_title("Figure 2 at small scale: ViT-Tiny-32, synthetic shapes")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    lines = ["| objective | final zero-shot top-1 (per seed) | training GFLOPs per image |", "|---|---|---:|"]
    for objective, info in summary.items():
        finals = ", ".join(f"{100 * v:.1f}%" for v in info["final"])
        lines.append(f"| {OBJECTIVES[objective]} | {finals} | {flops[objective] / 1e9:.3f} |")
    lines += ["", "| comparison | level (top-1) | images: slower / faster | ratio | paper |", "|---|---:|---|---:|---:|"]
    for (slow, fast), paper in PAPER.items():
        if slow not in summary or fast not in summary:
            continue
        level = min(max(y for _, y in summary[slow]["curve"]), max(y for _, y in summary[fast]["curve"]))
        if level < 2 * CHANCE:  # a curve that never leaves chance has no "images to reach" it
            lines.append(f"| {OBJECTIVES[slow]} vs {OBJECTIVES[fast]} | - | - | n/a: no signal above 2x chance | "
                         f"{paper:.0f}x |")
            continue
        need_slow, need_fast = (images_to_reach(summary[o]["curve"], level) for o in (slow, fast))
        ratio = f"{need_slow / need_fast:.1f}x" if need_slow and need_fast else "n/a"
        lines.append(f"| {OBJECTIVES[slow]} vs {OBJECTIVES[fast]} | {100 * level:.1f}% | "
                     f"{need_slow:,.0f} / {need_fast:,.0f} | {ratio} | {paper:.0f}x |" if need_slow and need_fast else
                     f"| {OBJECTIVES[slow]} vs {OBJECTIVES[fast]} | {100 * level:.1f}% | - | n/a | {paper:.0f}x |")
    lines += ["", f"Mean caption length {flops['tokens']:.1f} tokens; ratios at the highest accuracy both curves "
              "(means over seeds) reach, images linearly interpolated between evaluations."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
