"""``clipforge export``: a model as deployment graphs (ONNX image and text graphs plus a manifest)."""

from __future__ import annotations

import argparse

from clipforge.errors import ClipforgeError

FORMATS = ("onnx",)
EXAMPLES = """examples:
  clipforge export ViT-B-32/laion2b_s34b_b79k vit-b-32-onnx/ --to onnx
  clipforge export my_checkpoint.pt exported/ --to onnx --model-config ViT-B-16 --overwrite
  clipforge embed photos/ out/ --model vit-b-32-onnx/     # embed with onnxruntime, no torch imported

The folder holds image.onnx (pixels in [0, 1], [batch, 3, S, S] -> L2-normalised image_embeds, mean/std inside),
text.onnx (int64 input_ids [batch, length] -> text_embeds) and clipforge_onnx.json (preprocessing and tokenizer
settings). Both graphs are checked against the PyTorch model under onnxruntime (max abs difference 1e-4)."""


def _format(text: str) -> str:
    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"--to {text[:40]!r} is not an export format; the only one is onnx")
    return text


def add_export_parser(sub: argparse._SubParsersAction, gelu_help: str) -> argparse.ArgumentParser:
    from clipforge.cli.convert_command import add_architecture_options
    from clipforge.runtime.manifest import DEFAULT_OPSET

    parser = sub.add_parser("export", help="export a model as ONNX image and text graphs for deployment",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint path or folder, released name, ARCH/TAG or hf-hub:ORG/REPO")
    parser.add_argument("dir", help="output folder (new or empty; --overwrite replaces an earlier export)")
    parser.add_argument("--to", type=_format, required=True, metavar="onnx", help="export format: onnx")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset of the graphs (default {DEFAULT_OPSET}; at least 14)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--device", default="cpu", help="where the model is traced: cpu (default), cuda, cuda:N")
    parser.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    add_architecture_options(parser)
    parser.set_defaults(run=run_export_command)
    return parser


def run_export_command(args: argparse.Namespace) -> int:
    from clipforge.cli.devices import resolve_device
    from clipforge.export.onnx_export import export_onnx

    if args.source == args.dir:
        raise ClipforgeError(f"the output folder '{str(args.dir)[:120]}' is the source; export into another folder")
    device = resolve_device(args.device)
    manifest = export_onnx(args.source, args.dir, opset=args.opset, overwrite=args.overwrite, device=device,
                           quick_gelu=args.quick_gelu, model=args.model_config, pretrained=args.pretrained,
                           image_size=args.image_size)
    towers = " and ".join(name for name in ("image", "text") if manifest.get(name))
    diffs = ", ".join(f"{name} {diff:.1e}" for name, diff in manifest["max_abs_diff"].items())
    print(f"exported {manifest['model_name']} ({towers} graphs, opset {manifest['opset']}) to {args.dir}; "
          f"onnxruntime agrees with PyTorch to {diffs} (max abs)")
    return 0
