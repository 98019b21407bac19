"""``clipforge classify``: zero-shot labels for image files and folders, as tables and optionally a CSV/JSON file.

Every input is checked before the model loads, so a typo costs no loading time. An image that cannot be
read is skipped, named and counted under the reason training and ``eval`` use; the exit status is 1 when
any was skipped, so scripts notice.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from clipforge.errors import ClipforgeError

if TYPE_CHECKING:  # torch and the model load only when the command runs, so --help stays quick
    import torch

    from clipforge.models.clip import CLIP

OUTPUT_SUFFIXES = (".csv", ".json")


def add_classify_parser(sub: argparse._SubParsersAction, gelu_help: str) -> argparse.ArgumentParser:
    from clipforge.cli.convert_command import add_architecture_options
    from clipforge.cli.main import add_threads_option, positive_int

    classify = sub.add_parser("classify", help="zero-shot classify images with prompt-ensembled labels")
    classify.add_argument("images", nargs="+", help="image files, or folders searched recursively for images")
    classify.add_argument("--labels", help="comma-separated class names, e.g. 'dog,cat,bird'")
    classify.add_argument("--labels-file", help="a UTF-8 file with one class name per line")
    classify.add_argument("--model", required=True,
                          help="checkpoint path, released name (ViT-B-32), ARCH/TAG (ViT-B-32/laion2b_s34b_b79k) or "
                               "hf-hub:ORG/REPO")
    classify.add_argument("--templates", default="imagenet",
                          help="prompt set: imagenet (80 prompts, default), simple (7), none, or a file of templates "
                               "with {}")
    classify.add_argument("--top", type=positive_int, default=5, help="how many labels to show per image")
    classify.add_argument("--output", default=None, metavar="FILE.csv|FILE.json",
                          help="also write one row per image: its top labels with probabilities, or why it was "
                               "skipped")
    classify.add_argument("--batch-size", type=positive_int, default=32, help="images encoded at once")
    classify.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    add_threads_option(classify)
    classify.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    add_architecture_options(classify)
    classify.set_defaults(run=run_classify_command)
    return classify


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Class names from --labels and --labels-file, in that order."""
    from clipforge.evaluation.retrieval_data import read_text

    names = [label.strip() for label in (labels or "").split(",") if label.strip()]
    if labels_file:
        names += [line.strip() for line in read_text(labels_file, "labels file").splitlines() if line.strip()]
    if not names:
        raise ClipforgeError("no labels given; pass --labels 'a dog,a cat' or --labels-file FILE")
    return names


def read_prompt_templates(spec: str) -> list[str]:
    """``none`` (the bare label), a built-in set name, or a file of templates."""
    from clipforge.evaluation import read_templates

    return ["{}"] if spec == "none" else read_templates(spec)


def image_paths(inputs: list[str]) -> list[str]:
    """Files as given (a missing one is skipped later, by name); folders become their images (by suffix, hidden
    files left out), recursively, sorted by path."""
    from clipforge.evaluation.datasets import IMAGE_SUFFIXES
    from clipforge.evaluation.retrieval_data import short

    paths: list[str] = []
    for given in inputs:
        if not os.path.isdir(given):
            paths.append(given)
            continue
        found = sorted(os.path.join(parent, f) for parent, _, files in os.walk(given) for f in files
                       if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
        if not found:
            raise ClipforgeError(f"folder '{short(given)}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                                 "pass image files or a folder of them")
        paths += found
    return paths


def check_output(output: str | None) -> Path | None:
    from clipforge.evaluation.retrieval_data import short

    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ClipforgeError(f"--output '{short(output)}' must end in .csv or .json, which say how to write it")
    if path.is_dir():
        raise ClipforgeError(f"--output '{short(output)}' is a folder; name a .csv or .json file")
    return path


def run_classify_command(args: argparse.Namespace) -> int:
    import torch

    from clipforge.cli.convert_command import load_image_model
    from clipforge.cli.devices import resolve_device
    from clipforge.cli.main import apply_threads
    from clipforge.data.skips import format_counts
    from clipforge.evaluation import build_zero_shot_classifier

    labels = read_labels(args.labels, args.labels_file)
    templates = read_prompt_templates(args.templates)
    paths = image_paths(args.images)
    output = check_output(args.output)
    device = resolve_device(args.device)
    apply_threads(args)
    model, preprocess = load_image_model(args, device, "classify images")
    classifier = build_zero_shot_classifier(model, labels, templates)
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), args.batch_size):
            rows += _classify_batch(model, preprocess, classifier, labels, paths[start:start + args.batch_size],
                                    min(args.top, len(labels)), device)
    skipped = [row for row in rows if "skipped" in row]
    if output is not None:
        _write_rows(output, rows, min(args.top, len(labels)), args.model, labels)
        print(f"\nwrote {len(rows)} rows to {output}")
    if skipped:
        print(f"\n{len(skipped)} of {len(rows)} images could not be read ({format_counts(_counts(rows))})",
              file=sys.stderr)
    return 1 if skipped else 0


def _classify_batch(model: CLIP, preprocess: Callable[[Any], torch.Tensor], classifier: torch.Tensor,
                    labels: list[str], paths: list[str], top: int, device: torch.device) -> list[dict[str, Any]]:
    """One row per path, in order: the top labels and probabilities, or the skip reason and error."""
    import torch

    from clipforge.cli.main import _print_table
    from clipforge.evaluation.features import skip_reason
    from clipforge.transforms import load_image

    rows: list[dict[str, Any]] = []
    pixels = []
    for path in paths:
        try:
            pixels.append(preprocess(load_image(path)))
            rows.append({"path": path})
        except ClipforgeError as error:
            print(f"skipped: {error}", file=sys.stderr)
            rows.append({"path": path, "skipped": skip_reason(path), "error": " ".join(str(error).split())})
    if pixels:
        features = model.encode_image(torch.stack(pixels).to(device), normalize=True).float()
        probs = (model.logit_scale_value().float() * features @ classifier.float()).softmax(dim=-1).cpu()
        good = [row for row in rows if "skipped" not in row]
        for row, p in zip(good, probs):
            values, indices = p.topk(top)
            row["top"] = [{"label": labels[i], "prob": round(v, 6)} for v, i in zip(values.tolist(), indices.tolist())]
    for row in rows:
        if "top" in row:
            print(f"\n{_printable(row['path'])}")
            _print_table(("rank", "label", "prob"), [(str(rank + 1), item["label"], f"{item['prob']:.4f}")
                                                     for rank, item in enumerate(row["top"])])
    return rows


def _printable(path: str) -> str:
    """A file name with bytes that are not UTF-8 (kept by Python as surrogates) shown as escapes, not a crash."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """{reason: images skipped for it}."""
    counts: dict[str, int] = {}
    for row in rows:
        if "skipped" in row:
            counts[row["skipped"]] = counts.get(row["skipped"], 0) + 1
    return dict(sorted(counts.items()))


def _write_rows(output: Path, rows: list[dict[str, Any]], top: int, model: str, labels: list[str]) -> None:
    from clipforge.checkpoints.atomic import atomic_write

    if output.suffix.lower() == ".json":
        text = json.dumps({"model": str(model), "labels": labels, "images": rows, "skipped": _counts(rows)},
                          indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "skipped", "error"] + [f"{kind}_{k}" for k in range(1, top + 1)
                                                        for kind in ("label", "prob")])
        for row in rows:
            ranked = [value for item in row.get("top", []) for value in (item["label"], f"{item['prob']:.6f}")]
            writer.writerow([row["path"], row.get("skipped", ""), row.get("error", "")] + ranked)
        text = buffer.getvalue()
    try:
        atomic_write(output, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))
    except OSError as error:
        raise ClipforgeError(f"cannot write --output '{output}': {error.strerror or error}; pick a folder you can "
                             "write to") from None
