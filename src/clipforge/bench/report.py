"""Ratios to the anchors, the issue's targets, and the markdown table."""

from __future__ import annotations

import math
from typing import Any

from clipforge.bench.common import Row

# Issue #5: a fast path must keep the function, to these cosine similarities with the float32 reference.
AGREEMENT = {"fp32": 0.99999, "bf16": 0.999}
# Issue #5's targets: (section, what is compared, required ratio).
TARGETS = {"image": 2.0, "text": 4.0, "train": 1.5, "tokenizer_openai": 10.0, "tokenizer_hf": 1.0}
HEADINGS = {"image": "Image embedding", "text": "Text embedding (real captions)", "train": "Training step",
            "tokenizer": "Tokenizer", "decode": "JPEG decode + preprocessing", "loss": "Contrastive loss peak memory"}


def _best(rows: list[Row], prefix: str) -> Row | None:
    candidates = [r for r in rows if r.impl.startswith(prefix) and not math.isnan(r.value)]
    return max(candidates, key=lambda r: r.value) if candidates else None


def add_ratios(rows: list[Row]) -> None:
    """vs_open_clip / vs_hf: this figure over the best open_clip / HF figure of the same group and precision."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.section, row.model, row.precision), []).append(row)
    for group in groups.values():
        oc, hf = _best(group, "open_clip"), _best(group, "HF")
        for row in group:
            if row.section == "loss":
                continue
            row.vs_open_clip = row.value / oc.value if oc else None
            row.vs_hf = row.value / hf.value if hf else None


def _agrees(row: Row) -> bool:
    return row.agree_ref is not None and row.agree_ref >= AGREEMENT.get(row.precision, AGREEMENT["bf16"])


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """Each target of the issue, measured in this run: the ratio, the bar, met or not."""
    out = []
    for section in ("image", "text", "train"):
        for model in dict.fromkeys(r.model for r in rows if r.section == section):
            group = [r for r in rows if r.section == section and r.model == model]
            ours = _best([r for r in group if _agrees(r)], "clipforge")
            if section == "image":
                theirs, against = _best([r for r in group if r.precision == "fp32"], "open_clip"), "open_clip float32"
            else:
                theirs, against = _best(group, "open_clip"), "open_clip's best mode"
            if ours and theirs:
                ratio = ours.value / theirs.value
                out.append({"target": f"{section} {model}: >= {TARGETS[section]}x {against}", "ratio": ratio,
                            "met": ratio >= TARGETS[section], "ours": f"{ours.impl} {ours.precision}",
                            "theirs": f"{theirs.impl} {theirs.precision}"})
    tokens = [r for r in rows if r.section == "tokenizer"]
    for kind in ("warm", "cold"):
        ours = next((r for r in tokens if r.impl == "clipforge" and r.precision == kind), None)
        for name, key in (("OpenAI clip.tokenize", "tokenizer_openai"), ("HF CLIPTokenizerFast", "tokenizer_hf")):
            theirs = next((r for r in tokens if r.impl == name and r.precision == kind), None)
            if ours and theirs:
                ratio = ours.value / theirs.value
                out.append({"target": f"tokenizer ({kind}): >= {TARGETS[key]}x {name}", "ratio": ratio,
                            "met": ratio >= TARGETS[key], "ours": "clipforge", "theirs": name})
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _agreement(row: Row) -> str:
    if row.agree_ref is None:
        return ""
    if row.section in ("image", "text", "train"):
        text = f"{row.agree_ref:.6f}"
        return text + (f" / {row.agree_open_clip:.6f}" if row.agree_open_clip is not None else "")
    if row.section == "tokenizer":
        return f"{row.agree_ref:.0%} rows equal"
    if row.section == "decode":
        return f"{row.agree_ref:.2f} levels"
    return f"{row.agree_ref:.1e} rel."


def markdown(rows: list[Row], env: dict[str, Any], ceilings: dict[str, float], command: str) -> str:
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    lines = [(f"Measured {env['date']} on {env['cpu']} ({env['cpus']} CPUs, {env['torch_threads']} torch threads{gpu}), "
              f"torch {env['torch']}, open_clip {env.get('open_clip')}, transformers {env.get('transformers')}; "
              f"load average at start {env.get('load_average')}."), "",
             f"Command: `{command}`", "",
             "Matmul ceiling measured at start: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceilings.items())
             + ". MFU = achieved model FLOP/s over the ceiling of the row's precision.", "",
             ("Agreement: embeddings and gradients, cosine similarity with clipforge's float32 reference "
              "(worst row; clipforge rows also / against open_clip float32); tokenizer, rows with OpenAI's ids; "
              "decode, mean |difference| from the exact preprocessing; loss, relative difference from the naive loss."),
             ""]
    for section, heading in HEADINGS.items():
        group = [r for r in rows if r.section == section]
        if not group:
            continue
        lines += [f"### {heading}", "",
                  ("| model | implementation | precision | figure | x open_clip | x HF | MFU | agreement | note |"),
                  "|---|---|---|---:|---:|---:|---:|---|---|"]
        for r in group:
            figure = _fmt(r.value, ",.1f" if r.value < 1000 else ",.0f", f" {r.unit}")
            lines.append(f"| {r.model} | {r.impl} | {r.precision} | {figure} | {_fmt(r.vs_open_clip, '.2f', 'x')} | "
                         f"{_fmt(r.vs_hf, '.2f', 'x')} | {_fmt(r.mfu, '.0%')} | {_agreement(r)} | {r.note} |")
        lines.append("")
    checks = targets(rows)
    if checks:
        lines += ["### Targets (issue #5)", "", "| target | measured | met | clipforge row | against |",
                  "|---|---:|---|---|---|"]
        lines += [f"| {t['target']} | {t['ratio']:.2f}x | {'yes' if t['met'] else 'no'} | {t['ours']} | {t['theirs']} |"
                  for t in checks]
        lines.append("")
    return "\n".join(lines)
