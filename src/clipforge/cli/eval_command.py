"""``clipforge eval``: zero-shot, linear-probe and retrieval evaluations of any loadable model."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  clipforge eval --model ViT-B-32 --zero-shot cifar10=data/cifar10 --zero-shot fashion-mnist=data/fashion-mnist
  clipforge eval --model runs/flickr8k/checkpoints/step_00002000.pt --retrieval flickr8k=data/flickr8k/captions.tsv
  clipforge eval --model hf-hub:ORG/REPO --linear-probe cifar10=data/cifar10 --output results/
  clipforge eval --model my.safetensors --zero-shot imagefolder=photos,classnames=names.txt,templates=prompts.txt

Each NAME=PATH takes options after commas: split=, classnames=, templates=, max_samples=, image_root=.
NAME is a format: cifar10, cifar100, mnist, fashion-mnist, imagefolder, csv (classification);
flickr8k, flickr30k, coco, csv (retrieval: Karpathy JSON, image/caption/split TSV or Flickr token file)."""


def add_eval_parser(sub: argparse._SubParsersAction, gelu_help: str) -> None:
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
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--device", default="cpu")
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
    from clipforge.checkpoints import load
    from clipforge.errors import ClipforgeError
    from clipforge.evaluation.runner import EvalSpec, run_evals

    specs = [EvalSpec.parse(task, text) for task, texts in (("zero_shot", args.zero_shot),
                                                           ("linear_probe", args.linear_probe),
                                                           ("retrieval", args.retrieval)) for text in texts]
    if not specs:
        raise ClipforgeError("nothing to evaluate; pass --zero-shot, --linear-probe or --retrieval NAME=PATH")
    if args.batch_size <= 0 or args.workers < 0:
        raise ClipforgeError("--batch-size must be positive and --workers >= 0")
    model, preprocess = load(args.model, device=args.device, quick_gelu=args.quick_gelu, model=args.model_config,
                             pretrained=args.pretrained, image_size=args.image_size)
    output = Path(args.output)
    cache = None if args.feature_cache == "none" else Path(args.feature_cache or output / "feature_cache")
    run_evals(specs, model, preprocess, model_name=str(args.model), output_dir=output, batch_size=args.batch_size,
              num_workers=args.workers, precision=args.precision, cache_dir=cache, progress=not args.no_progress,
              confusion=args.confusion)
    print(f"results: {output}/ (one JSON per evaluation, summary.md)")
    return 0
