"""Ratios to the anchors, the issue's targets, and the markdown table."""

from __future__ import annotations

import math
import statistics
from typing import Any

from clipforge.bench.common import Row

# Issue #5: a fast path must keep the function, to these cosine similarities with the float32 reference.
AGREEMENT = {"fp32": 0.99999, "bf16": 0.999}
# Issue #14's targets, each against the fastest mode of each peer that agrees with the reference
# (eager or compiled, any precision): section -> (required ratio, peers compared with).
TARGETS = {"image": (1.4, ("open_clip",)), "text": (2.0, ("open_clip", "HF")), "train": (1.5, ("open_clip",))}
MODEL_TARGETS = {("image", "RN50"): 1.2}  # RN50's image tower: >= 1.2x (the ViT's bar is 1.4x)
MFU_TARGET = {("image", "ViT-B-32"): 0.85}  # share of the measured bf16 matmul ceiling
TOKENIZER_TARGETS = {"OpenAI": 10.0, "HF": 2.0}  # cold, on 5,000 captions; warm shown beside it
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


def _model_bar(section: str, model: str, default: float) -> float:
    base = model.split(" ")[0].removesuffix("-quickgelu")
    return MODEL_TARGETS.get((section, base), default)


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """Each target of the issue, measured in this run: the ratio, the bar, met or not.

    Both sides are the fastest row that agrees with clipforge's float32 reference (fp32 rows to
    cosine 0.99999, bf16 rows to 0.999), over every mode measured: precision, layout, compiled or not.
    """
    out = []
    for section, (default_bar, peers) in TARGETS.items():
        for model in dict.fromkeys(r.model for r in rows if r.section == section):
            group = [r for r in rows if r.section == section and r.model == model and _agrees(r)]
            ours = _best(group, "clipforge")
            theirs = [best for peer in peers if (best := _best(group, peer))]
            if not ours or not theirs:
                continue
            best = max(theirs, key=lambda r: r.value)
            bar = _model_bar(section, model, default_bar)
            ratio = ours.value / best.value
            out.append({"target": f"{section} {model}: >= {bar}x the best of {' and '.join(peers)}", "ratio": ratio,
                        "met": ratio >= bar, "ours": f"{ours.impl} {ours.precision}",
                        "theirs": f"{best.impl} {best.precision}"})
            mfu_bar = MFU_TARGET.get((section, model.split(" ")[0].removesuffix("-quickgelu")))
            bf16 = _best([r for r in group if r.precision == "bf16"], "clipforge")
            if mfu_bar and bf16 is not None and bf16.mfu is not None:
                out.append({"target": f"{section} {model}: >= {mfu_bar:.0%} of the measured bf16 matmul ceiling",
                            "ratio": bf16.mfu, "met": bf16.mfu >= mfu_bar, "ours": f"{bf16.impl} {bf16.precision}",
                            "theirs": "bf16 matmul ceiling", "unit": "share"})
    tokens = [r for r in rows if r.section == "tokenizer"]
    for model in dict.fromkeys(r.model for r in tokens):
        for kind in ("cold", "warm"):
            group = [r for r in tokens if r.model == model and r.precision == kind]
            ours = next((r for r in group if r.impl == "clipforge"), None)
            for peer, bar in TOKENIZER_TARGETS.items():
                theirs = _best(group, peer)
                if ours and theirs:
                    ratio = ours.value / theirs.value
                    out.append({"target": f"tokenizer {model} ({kind}): >= {bar}x {peer}'s fastest", "ratio": ratio,
                                "met": ratio >= bar, "ours": "clipforge", "theirs": theirs.impl})
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
                  ("| model | implementation | precision | figure | x open_clip | x HF | MFU | agreement | CPU s / wall s "
                   "| load | note |"),
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in group:
            figure = _fmt(r.value, ",.1f" if r.value < 1000 else ",.0f", f" {r.unit}")
            cpu = (f"{statistics.median(r.cpu_seconds) / statistics.median(r.seconds):.2f}"
                   if r.cpu_seconds and r.seconds else "")
            lines.append(f"| {r.model} | {r.impl} | {r.precision} | {figure} | {_fmt(r.vs_open_clip, '.2f', 'x')} | "
                         f"{_fmt(r.vs_hf, '.2f', 'x')} | {_fmt(r.mfu, '.0%')} | {_agreement(r)} | {cpu} | "
                         f"{_fmt(r.load, '.1f')} | {r.note} |")
        lines.append("")
    checks = targets(rows)
    if checks:
        lines += ["### Targets (issue #14: against each peer's fastest mode that agrees with the reference)", "",
                  "| target | measured | met | clipforge row | against |", "|---|---:|---|---|---|"]
        for t in checks:
            measured = f"{t['ratio']:.0%}" if t.get("unit") == "share" else f"{t['ratio']:.2f}x"
            lines.append(f"| {t['target']} | {measured} | {'yes' if t['met'] else 'no'} | {t['ours']} | {t['theirs']} |")
        lines.append("")
    return "\n".join(lines)
