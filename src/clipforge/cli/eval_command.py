"""``clipforge eval``: zero-shot, linear-probe and retrieval evaluations of any loadable model."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  clipforge eval --model ViT-B-32 --zero-shot cifar10=data/cifar10 --zero-shot fashion-mnist=data/fashion-mnist
  clipforge eval --model runs/flickr8k/checkpoints/step_00002000.pt --retrieval flickr8k=data/flickr8k/captions.tsv
  clipforge eval --model hf-hub:ORG/REPO --linear-probe cifar10=data/cifar10 --output results/
  clipforge eval --model my.safetensors --zero-shot imagefolder=photos,classnames=names.txt,templates=prompts.txt

Each NAME=PATH takes options after commas: split=, classnames=, templates=, max_samples=, image_root=,
train_split= (linear probe), image_column= and label_column= (csv classification).
NAME is a format: cifar10, cifar100, mnist, fashion-mnist, imagefolder, csv (classification);
flickr8k, flickr30k, coco, csv (retrieval: Karpathy JSON, image/caption/split TSV or Flickr token file);
or wds/NAME for a CLIP_benchmark WebDataset copy (a local folder or hf-hub:clip-benchmark/wds_NAME), e.g.
  --zero-shot wds/cifar10=data/wds_cifar10   --retrieval wds/flickr8k=hf-hub:clip-benchmark/wds_flickr8k
whose dataset_type.txt picks the metrics (multilabel: mean average precision, under --zero-shot)."""


def add_eval_parser(sub: argparse._SubParsersAction, gelu_help: str) -> None:
    from clipforge.cli.main import add_threads_option, non_negative_int, positive_int

    parser = sub.add_parser("eval", help="zero-shot, linear-probe and retrieval evaluation",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint path, released name or hf-hub:ORG/REPO")
    parser.add_argument("--zero-shot", action="append", default=[], metavar="NAME=PATH[,opt=value]",
                        help="zero-shot classification (repeatable)")
    parser.add_argument("--linear-probe", action="append", default=[], metavar="NAME=PATH[,opt=value]",
                        help="L-BFGS logistic-regression probe on frozen features (repeatable)")
    parser.add_argument("--retrieval", action="append", default=[], metavar="NAME=PATH[,opt=value]",
                        help="image<->text Recall@1/5/10 (repeatable)")
    parser.add_argument("--output", default="eval_results", help="folder for the JSON results and summary.md")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes (0: none)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    add_threads_option(parser)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--feature-cache", default=None,
                        help="folder for cached image features (default: OUTPUT/feature_cache; 'none' disables)")
    parser.add_argument("--confusion", action="store_true", help="also write a confusion-matrix PNG per zero-shot eval")
    parser.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto", help=gelu_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    from clipforge.cli.convert_command import add_architecture_options

    add_architecture_options(parser)
    parser.set_defaults(run=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    """Check every spec and option first (no model is loaded for a typo), then run and write the results."""
    from clipforge.cli.convert_command import load_image_model
    from clipforge.cli.devices import resolve_device
    from clipforge.cli.main import apply_threads
    from clipforge.errors import ClipforgeError
    from clipforge.evaluation.retrieval_data import short
    from clipforge.evaluation.runner import EvalSpec, run_evals

    specs = [EvalSpec.parse(task, text) for task, texts in (("zero_shot", args.zero_shot),
                                                           ("linear_probe", args.linear_probe),
                                                           ("retrieval", args.retrieval)) for text in texts]
    if not specs:
        raise ClipforgeError("nothing to evaluate; pass --zero-shot, --linear-probe or --retrieval NAME=PATH")
    for spec in specs:
        spec.check_paths()
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ClipforgeError(f"--output '{short(args.output)}' is a file; name a folder for the results")
    device = resolve_device(args.device)
    apply_threads(args)
    model, preprocess = load_image_model(args, device, "be evaluated on images")
    cache = None if args.feature_cache == "none" else Path(args.feature_cache or output / "feature_cache")
    run_evals(specs, model, preprocess, model_name=str(args.model), output_dir=output, batch_size=args.batch_size,
              num_workers=args.workers, precision=args.precision, cache_dir=cache, progress=not args.no_progress,
              confusion=args.confusion)
    print(f"results: {output}/ (one JSON per evaluation, summary.md)")
    return 0
