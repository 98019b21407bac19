"""``clipforge convert``: read any checkpoint clipforge loads, write it as clipforge, open_clip or Hugging Face."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.errors import ClipforgeError


def add_architecture_options(parser: argparse.ArgumentParser) -> None:
    """Options that say what a checkpoint does not record (shared by the commands that load one)."""
    parser.add_argument("--model-config", dest="model_config", default=None,
                        help="architecture of a plain state dict: a name (clipforge models), a JSON config "
                             "(clipforge's or open_clip's schema), or 'openai' for OpenAI's rule")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag for an architecture name (clipforge models --pretrained)")
    parser.add_argument("--image-size", dest="image_size", type=int, default=None,
                        help="run at this resolution: position embeddings are resized as open_clip does")


def _writes_folder(dest: Path, to: str) -> bool:
    return to != "clipforge" or dest.suffix != ".safetensors"


def check_destination(source: str, dest: str | Path, to: str, overwrite: bool) -> None:
    """Refuse, before anything is loaded, to write onto the source or over files the user did not offer up."""
    dest = Path(dest).expanduser()
    source_path = Path(source).expanduser()
    if source_path.exists() or source_path.is_symlink():
        src, dst, folder = source_path.resolve(), dest.resolve(), _writes_folder(dest, to)
        beside_file = src.is_file() and folder and dst == src.parent  # files written next to (or over) the source
        into_folder = src.is_dir() and not folder and dst.parent == src  # a file written into the source folder
        if src == dst or beside_file or into_folder:
            raise ClipforgeError(f"destination '{dest}' is the source '{source}' or the folder holding it; convert "
                                 "into another folder or file")
    if dest.is_dir():
        if not _writes_folder(dest, to):
            raise ClipforgeError(f"destination '{dest}' is a folder; --to clipforge with a .safetensors name writes "
                                 "a file, so choose another name")
        try:
            empty = not any(dest.iterdir())
        except OSError:
            raise ClipforgeError(f"destination folder '{dest}' cannot be read; choose another folder") from None
        if not overwrite and not empty:
            raise ClipforgeError(f"destination folder '{dest}' is not empty; choose an empty or new folder, or pass "
                                 "--overwrite to replace the files it holds")
    elif dest.exists() or dest.is_symlink():
        if _writes_folder(dest, to):
            raise ClipforgeError(f"destination '{dest}' is a file, but --to {to} writes a folder; choose a folder "
                                 "name" + (", or a .safetensors file name" if to == "clipforge" else ""))
        if not overwrite:
            raise ClipforgeError(f"destination '{dest}' already exists; choose a new file name, or pass --overwrite "
                                 "to replace it")


def load_image_model(args: argparse.Namespace, device, purpose: str):
    """(model, preprocess) named by --model and the architecture options, refusing a text-only model."""
    from clipforge.checkpoints import load
    from clipforge.errors import ClipforgeError

    model, preprocess = load(args.model, device=device, quick_gelu=args.quick_gelu, model=args.model_config,
                             pretrained=args.pretrained, image_size=args.image_size)
    if preprocess is None:
        raise ClipforgeError(f"'{str(args.model)[:120]}' is a text-only model, which cannot {purpose}; pass a CLIP "
                             "model with an image tower")
    return model, preprocess


def _run(args: argparse.Namespace) -> int:
    from clipforge.checkpoints import load, save

    local = Path(args.source).expanduser()
    if local.exists() or local.is_symlink():  # fail fast, before a long load; a missing source is load's to name
        check_destination(args.source, args.dest, args.to, args.overwrite)
    model, _ = load(args.source, quick_gelu=args.quick_gelu, model=args.model_config, pretrained=args.pretrained,
                    image_size=args.image_size)
    check_destination(args.source, args.dest, args.to, args.overwrite)  # for downloaded sources too
    written = save(model, args.dest, format=args.to)
    print(f"wrote {args.to} checkpoint of {model.config.name} to {written}")
    return 0


def add_convert_parser(sub: argparse._SubParsersAction, gelu_help: str) -> None:
    convert = sub.add_parser("convert", help="convert a checkpoint between formats")
    convert.add_argument("source", help="checkpoint path or folder, released name, ARCH/TAG or hf-hub:ORG/REPO")
    convert.add_argument("dest", help="output folder (or .safetensors file for --to clipforge)")
    convert.add_argument("--to", required=True, choices=("hf", "open_clip", "clipforge"))
    convert.add_argument("--overwrite", action="store_true",
                         help="write into a non-empty folder or over an existing file (never onto the source)")
    convert.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    add_architecture_options(convert)
    convert.set_defaults(run=_run)
