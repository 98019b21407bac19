"""The ``clipforge`` command: models, classify, convert, train, eval, make-shards.

Errors a user can cause print one sentence and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from clipforge.errors import ClipforgeError


def _print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def _labels(args: argparse.Namespace) -> list[str]:
    labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
    if args.labels_file:
        path = Path(args.labels_file)
        if not path.is_file():
            raise ClipforgeError(f"labels file '{path}' does not exist; check the path")
        labels += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ClipforgeError("no labels given; pass --labels 'a dog,a cat' or --labels-file FILE")
    return labels


def _templates(spec: str) -> list[str]:
    from clipforge.evaluation import get_templates

    if spec == "none":
        return ["{}"]
    path = Path(spec)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return get_templates(spec)


def _cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from clipforge.checkpoints import load
    from clipforge.evaluation import build_zero_shot_classifier
    from clipforge.transforms import load_image

    labels = _labels(args)
    model, preprocess = load(args.model, device=args.device, quick_gelu=args.quick_gelu, model=args.model_config,
                             pretrained=args.pretrained, image_size=args.image_size)
    classifier = build_zero_shot_classifier(model, labels, _templates(args.templates))
    failures = 0
    for image_path in args.images:
        try:
            image = preprocess(load_image(image_path)).unsqueeze(0).to(args.device)
        except ClipforgeError as error:
            print(f"skipped: {error}", file=sys.stderr)
            failures += 1
            continue
        with torch.no_grad():
            features = model.encode_image(image, normalize=True).float()
            probs = (model.logit_scale_value().float() * features @ classifier).softmax(dim=-1)[0]
        top = probs.topk(min(args.top, len(labels)))
        print(f"\n{image_path}")
        _print_table(("rank", "label", "prob"), [
            (str(rank + 1), labels[i], f"{p:.4f}") for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))
        ])
    if failures:
        print(f"\n{failures} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failures else 0


def _overrides(extra: list[str]) -> dict[str, str]:
    """['--lr', '1e-3', '--data.path', 'x.csv', '--grad-checkpointing'] -> {'lr': '1e-3', ...}."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--"):
            raise ClipforgeError(f"unexpected argument '{token}'; training options are written --name value")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if index + 1 < len(extra) and not extra[index + 1].startswith("--"):
                value, index = extra[index + 1], index + 1
            else:
                value = "true"  # a bare flag such as --grad-checkpointing
        overrides[key] = value
        index += 1
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from clipforge.training import load_train_config, train

    config = load_train_config(args.config, _overrides(args.overrides))
    train(config)
    return 0


def _quick_gelu(value: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP models: classify, convert, list.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    from clipforge.cli.models_command import add_models_parser

    add_models_parser(sub)

    gelu_help = ("activation for plain state dicts, which do not record it (and an override elsewhere): "
                 "auto (from the checkpoint or --model-config), yes (QuickGELU), no (GELU)")
    classify = sub.add_parser("classify", help="zero-shot classify images with prompt-ensembled labels")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--labels", help="comma-separated class names, e.g. 'dog,cat,bird'")
    classify.add_argument("--labels-file", help="a file with one class name per line")
    classify.add_argument("--model", required=True,
                          help="checkpoint path, released name (ViT-B-32), ARCH/TAG (ViT-B-32/laion2b_s34b_b79k) or hf-hub:ORG/REPO")
    classify.add_argument("--templates", default="imagenet",
                          help="prompt set: imagenet (80 prompts, default), simple (7), none, or a file of templates with {}")
    classify.add_argument("--top", type=int, default=5, help="how many labels to show per image")
    classify.add_argument("--device", default="cpu")
    classify.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    classify.set_defaults(run=_cmd_classify)

    from clipforge.cli.convert_command import add_architecture_options, add_convert_parser

    add_architecture_options(classify)
    add_convert_parser(sub, gelu_help)

    train = sub.add_parser("train", help="contrastive pre-training or fine-tuning (torchrun for many processes)",
                           description="Options come from --config (TOML or JSON) and are overridden by --name value "
                                       "pairs, e.g. --lr 1e-3 --data.path train.csv --grad-checkpointing. See "
                                       "clipforge.training.config.TrainConfig for every field.")
    train.add_argument("--config", help="TOML or JSON training config")
    train.set_defaults(run=_cmd_train)

    from clipforge.cli.eval_command import add_eval_parser

    add_eval_parser(sub, gelu_help)

    sub.add_parser("make-shards", help="turn a CSV/TSV dataset into WebDataset tar shards "
                                       "(clipforge make-shards --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-shards"]:  # its own parser, shared with python -m clipforge.data.make_shards
        from clipforge.data.make_shards import main as make_shards_main

        return _guarded(lambda: make_shards_main(argv[1:]), debug="--debug" in argv)
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "train":
        args.overrides = extra
    elif extra:
        build_parser().parse_args(argv)  # let argparse report the unknown arguments
    if hasattr(args, "quick_gelu"):
        args.quick_gelu = _quick_gelu(args.quick_gelu)
    return _guarded(lambda: args.run(args), debug=args.debug)


def _guarded(run, debug: bool) -> int:
    """User errors: one sentence on stderr, exit status 2 (the traceback only with --debug)."""
    try:
        return run()
    except ClipforgeError as error:
        if debug:
            raise
        print(f"clipforge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
