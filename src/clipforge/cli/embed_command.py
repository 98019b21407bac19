"""``clipforge embed``: a folder, table or shards (or a text file) into clip-retrieval's embedding layout.

The source is read and checked before the model loads, so a typo costs no loading time. Rerunning
the same command resumes; under torchrun each rank embeds its own parts.
"""

from __future__ import annotations

import argparse
import os

from clipforge.errors import ClipforgeError

EXAMPLES = """examples:
  clipforge embed photos/ out/ --model ViT-B-32
  clipforge embed pairs.csv out/ --model ViT-B-32/laion2b_s34b_b79k --image-column filepath --caption-column title
  clipforge embed 'shards/{00000..00099}.tar' out/ --model ViT-B-32 --caption-column txt
  clipforge embed --texts queries.txt out/ --model ViT-B-32
  torchrun --nproc_per_node 8 -m clipforge embed photos/ out/ --model ViT-L-14 --device cuda
  clipforge embed photos/ out/ --model vit-b-32-onnx/     # a clipforge export folder: onnxruntime, no torch

The output is clip-retrieval's: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet
(image_path, caption, size, mtime), plus embed_info.json and skipped.tsv; autofaiss and clip-retrieval
read it as they read their own."""


def add_embed_parser(sub: argparse._SubParsersAction, gelu_help: str) -> argparse.ArgumentParser:
    from clipforge.cli.convert_command import add_architecture_options
    from clipforge.cli.main import add_threads_option, non_negative_int, positive_int

    parser = sub.add_parser("embed", help="embed an image folder, CSV/TSV or shards into clip-retrieval's layout",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=None,
                        help="an image folder (searched recursively), a CSV/TSV table of image paths, or .tar "
                             "shards ('shards/{00000..00099}.tar'); omitted with --texts")
    parser.add_argument("out", help="output folder (new, empty, or an earlier run's, which is resumed)")
    parser.add_argument("--model", required=True,
                        help="checkpoint path, released name (ViT-B-32), ARCH/TAG, hf-hub:ORG/REPO, or a folder written "
                             "by clipforge export --to onnx (runs on onnxruntime without torch)")
    parser.add_argument("--texts", default=None, metavar="FILE",
                        help="embed texts only: a file with one text per line, or a CSV/TSV with --caption-column")
    parser.add_argument("--image-column", default=None,
                        help="the table's image path column (default: the first of filepath, image_path, image, "
                             "path, file, filename)")
    parser.add_argument("--caption-column", default=None,
                        help="the table's caption column (shards: the caption member, e.g. txt); its captions are "
                             "embedded too, row-aligned with the images")
    parser.add_argument("--image-root", default=None,
                        help="the folder the table's image paths are relative to (default: the table's folder)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="items encoded at once")
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="processes that decode and preprocess while the model runs (0: none)")
    parser.add_argument("--part-size", type=positive_int, default=10000,
                        help="items per output part: the unit of resuming and of sharing among ranks")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="compute precision; auto: bf16 on GPUs and CPUs with AVX-512-BF16/AMX, kept only if it "
                             "agrees with float32 (cosine >= 0.999) on the first batch")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="how the embeddings are stored (clip-retrieval: float16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (under torchrun: the "
                                                        "rank's GPU)")
    add_threads_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-part lines")
    parser.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    add_architecture_options(parser)
    parser.set_defaults(run=run_embed_command)
    return parser


def _device(text: str):
    """--device; a bare cuda (or auto with GPUs) under torchrun is this rank's GPU (LOCAL_RANK)."""
    import torch

    from clipforge.cli.devices import resolve_device

    device = resolve_device(text)
    local = os.environ.get("LOCAL_RANK", "").strip()
    if device.type == "cuda" and device.index is None and local.isdigit():
        index = int(local) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def load_onnx_model(args: argparse.Namespace) -> tuple:
    """(OnnxCLIP, its preprocess) for --model naming an export folder; options that only mean something for a
    checkpoint are refused in one sentence."""
    from clipforge.runtime import check_cpu_device
    from clipforge.runtime.onnx_model import OnnxCLIP

    check_cpu_device(args.device)
    given = [f"--{name.replace('_', '-')}" for name in ("model_config", "pretrained", "image_size")
             if getattr(args, name, None) is not None]
    if getattr(args, "quick_gelu", None) is not None:
        given.append("--quick-gelu")
    if getattr(args, "precision", "auto") not in ("auto", "fp32"):
        raise ClipforgeError(f"--precision {args.precision} is not available for an ONNX export, which onnxruntime "
                             "runs in float32; drop it or pass --precision fp32")
    if given:
        raise ClipforgeError(f"{given[0]} does not apply to an ONNX export (it is fixed when exporting); drop it, or "
                             "pass it to clipforge export")
    model = OnnxCLIP.load(args.model, threads=getattr(args, "threads", None))
    return model, model.preprocess


def run_embed_command(args: argparse.Namespace) -> int:
    from clipforge.cli.main import apply_threads
    from clipforge.collection.embed import embed_collection, resolve_rank
    from clipforge.collection.layout import INFO_NAME, SKIPPED_NAME, require_pyarrow
    from clipforge.collection.sources import open_source
    from clipforge.data.skips import format_counts

    if args.texts is not None and args.source is not None:
        raise ClipforgeError("pass either SOURCE (images, with captions from --caption-column) or --texts FILE "
                             "(texts only), not both")
    if args.texts is None and args.source is None:
        raise ClipforgeError("no input: pass SOURCE (an image folder, CSV/TSV table or .tar shards) before OUT, or "
                             "--texts FILE")
    require_pyarrow()
    source = open_source(args.texts if args.texts is not None else args.source, texts=args.texts is not None,
                         image_column=args.image_column, caption_column=args.caption_column,
                         image_root=args.image_root)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ClipforgeError(f"output '{args.out}' is a file; pass a folder (new, empty, or an earlier run's)")
    rank, world = resolve_rank()
    from clipforge.runtime import is_onnx_export

    if is_onnx_export(args.model):  # onnxruntime; torch is never imported
        apply_threads(args, torch_too=False)
        model, preprocess = load_onnx_model(args)
    else:
        from clipforge.checkpoints import load

        device = _device(args.device)
        apply_threads(args)
        model, preprocess = load(args.model, device=device, quick_gelu=args.quick_gelu, model=args.model_config,
                                 pretrained=args.pretrained, image_size=args.image_size)
    shown = str(args.model)[:120]
    if "img" in source.kinds and preprocess is None:
        raise ClipforgeError(f"'{shown}' is a text-only model, which cannot embed images; pass a CLIP model with an "
                             "image tower, or embed texts with --texts")
    if "text" in source.kinds and model.config.text is None:
        raise ClipforgeError(f"'{shown}' has no text tower, which embedding captions needs; drop --caption-column "
                             "or pass a model with a text tower")
    info = embed_collection(
        source, args.out, model, preprocess, batch_size=args.batch_size, num_workers=args.workers,
        part_size=args.part_size, dtype=args.dtype, precision=args.precision, rank=rank, world_size=world,
        progress=not args.no_progress,
        model_info={"model": args.model, "pretrained": args.pretrained, "model_config": args.model_config,
                    "quick_gelu": args.quick_gelu, "image_size": args.image_size})
    prefix = f"rank {rank}: " if world > 1 else ""
    if not info.complete:
        print(f"{prefix}wrote this process's parts; {info.parts_done} of {info.parts} parts are done, and the rank "
              f"that finishes last writes {INFO_NAME}")
        return 0
    what = " and ".join(f"{info.counts.get(k, 0)} {'images' if k == 'img' else 'texts'}" for k in info.kinds)
    print(f"{prefix}embedded {what} of {info.counts['items']} items into {args.out} ({info.parts} parts, "
          f"{info.dtype}, {info.precision})")
    if info.counts.get("skipped"):
        print(f"{prefix}skipped {info.counts['skipped']} ({format_counts(info.skipped)}), each named in "
              f"{os.path.join(args.out, SKIPPED_NAME)}")
    return 0
