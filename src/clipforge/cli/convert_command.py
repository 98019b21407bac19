"""``clipforge convert``: read any checkpoint clipforge loads, write it as clipforge, open_clip or Hugging Face."""

from __future__ import annotations

import argparse


def add_architecture_options(parser: argparse.ArgumentParser) -> None:
    """Options that say what a checkpoint does not record (shared by the commands that load one)."""
    parser.add_argument("--model-config", dest="model_config", default=None,
                        help="architecture of a plain state dict: a name (clipforge models), a JSON config "
                             "(clipforge's or open_clip's schema), or 'openai' for OpenAI's rule")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag for an architecture name (clipforge models --pretrained)")
    parser.add_argument("--image-size", dest="image_size", type=int, default=None,
                        help="run at this resolution: position embeddings are resized as open_clip does")


def _run(args: argparse.Namespace) -> int:
    from clipforge.checkpoints import load, save

    model, _ = load(args.source, quick_gelu=args.quick_gelu, model=args.model_config, pretrained=args.pretrained,
                    image_size=args.image_size)
    written = save(model, args.dest, format=args.to)
    print(f"wrote {args.to} checkpoint of {model.config.name} to {written}")
    return 0


def add_convert_parser(sub: argparse._SubParsersAction, gelu_help: str) -> None:
    convert = sub.add_parser("convert", help="convert a checkpoint between formats")
    convert.add_argument("source", help="checkpoint path or folder, released name, ARCH/TAG or hf-hub:ORG/REPO")
    convert.add_argument("dest", help="output folder (or .safetensors file for --to clipforge)")
    convert.add_argument("--to", required=True, choices=("hf", "open_clip", "clipforge"))
    convert.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    add_architecture_options(convert)
    convert.set_defaults(run=_run)
