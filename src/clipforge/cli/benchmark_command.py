"""``clipforge benchmark``: many datasets, one table with CLIP_benchmark's columns (benchmark.csv / .md)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  clipforge benchmark --model ViT-B-32 --pretrained laion2b_s34b_b79k --root data/clip_benchmark \\
      --datasets wds/cifar10,wds/vtab/cifar100,wds/imagenet1k,wds/imagenet-a,wds/flickr8k
  clipforge benchmark --model runs/x/checkpoints/step_00010000.pt --datasets datasets.txt --root /data \\
      --output bench_results/
  clipforge benchmark --model ViT-B-32 --root hf-hub:clip-benchmark --datasets wds/cifar10

wds/NAME is read from ROOT/wds_NAME (slashes in NAME become '-', CLIP_benchmark's folder names); other names
(imagenet, imagenetv2, imagenet-sketch, imagenet-a, imagenet-r, objectnet, cifar10, ...) from ROOT/NAME.
Results already computed for the same weights, data files and settings are reused; a dataset that fails is
named in its row and the others still run. With ImageNet and a shifted set, effective_robustness.png too."""


def add_benchmark_parser(sub: argparse._SubParsersAction, gelu_help: str) -> None:
    from clipforge.cli.main import add_threads_option, non_negative_int, positive_int

    parser = sub.add_parser("benchmark", help="evaluate on many datasets into one CLIP_benchmark-style table",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint path, released name or hf-hub:ORG/REPO")
    parser.add_argument("--datasets", required=True, help="comma-separated names, or a file with one per line")
    parser.add_argument("--root", required=True, help="folder holding the datasets (or hf-hub:clip-benchmark)")
    parser.add_argument("--output", default="benchmark_results", help="folder for benchmark.csv/.md and results/")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="a stratified subset per dataset")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes (0: none)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    add_threads_option(parser)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    from clipforge.cli.convert_command import add_architecture_options

    add_architecture_options(parser)
    parser.set_defaults(run=run_benchmark_command)


def run_benchmark_command(args: argparse.Namespace) -> int:
    from clipforge.cli.convert_command import load_image_model
    from clipforge.cli.devices import resolve_device
    from clipforge.cli.main import apply_threads
    from clipforge.errors import ClipforgeError
    from clipforge.evaluation.benchmark import read_dataset_list, run_benchmark

    datasets = read_dataset_list(args.datasets)
    if not args.root.startswith("hf-hub:") and not Path(args.root).expanduser().is_dir():
        raise ClipforgeError(f"--root '{args.root}' is not a folder; pass the folder that holds the datasets "
                             "(wds_cifar10/, imagenet/, ...) or hf-hub:clip-benchmark")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ClipforgeError(f"--output '{args.output}' is a file; name a folder for the results")
    device = resolve_device(args.device)
    apply_threads(args)
    model, preprocess = load_image_model(args, device, "be evaluated on images")
    rows = run_benchmark(model, preprocess, datasets, args.root, output_dir=output, model_name=str(args.model),
                         pretrained=args.pretrained or "", max_samples=args.max_samples, batch_size=args.batch_size,
                         num_workers=args.workers, precision=args.precision, cache_dir=output / "feature_cache",
                         progress=not args.no_progress)
    print((output / "benchmark.md").read_text(encoding="utf-8"))
    failed = [row["dataset"] for row in rows if row["error"]]
    print(f"results: {output}/benchmark.csv (CLIP_benchmark's columns), benchmark.md"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed and len(failed) == len(rows) else 0
