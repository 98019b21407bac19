"""python -m clipforge.bench: clipforge vs open_clip vs Hugging Face, measured side by side in one run.

    python -m clipforge.bench                       # the full suite, CPU (minutes)
    python -m clipforge.bench --quick               # few repetitions, smaller inputs
    python -m clipforge.bench --only image,text --models ViT-B-32 --json out/bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from pathlib import Path

import torch

from clipforge.bench import report
from clipforge.bench.common import (
    Row,
    default_data_dir,
    environment,
    load_inputs,
    matmul_ceiling,
    random_inputs,
)

SECTIONS = ("image", "text", "train", "tokenizer", "decode", "loss")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clipforge.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per figure (median); default 5, quick 2")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller inputs (tests, development)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--models", default="ViT-B-32-quickgelu,RN50-quickgelu",
                   help="models for the image and text sections (the -quickgelu configs are OpenAI's models)")
    p.add_argument("--train-models", default="ViT-B-32-quickgelu:32,ViT-Tiny-32:64", help="MODEL:BATCH pairs for training")
    p.add_argument("--batch", type=int, default=32, help="images/captions per embedding call")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--loss-sizes", default=None, help="batch sizes for the loss memory section")
    p.add_argument("--data", type=Path, default=None, help="the shared data folder holding flickr8k/")
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile modes: clipforge's for_inference(compile=True) image towers, and "
                        "every peer compiled (embedding and training), each in rows of their own with compile time")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write all figures as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown here")
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        _log(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        _log("--device cuda, but torch sees no CUDA device; run on a GPU machine or use --device cpu")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (2 if args.quick else 5)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    data_dir = args.data or default_data_dir()
    train_specs = [(s.split(":")[0], int(s.split(":")[1])) for s in args.train_models.split(",") if s.strip()]
    need = max([args.batch] + [b for _, b in train_specs])
    inputs = load_inputs(data_dir, need)
    if inputs is None:
        _log(f"Flickr8k not found under {data_dir} (pass --data); using random images and made-up captions, "
             "and skipping the tokenizer and decode sections")
        inputs = random_inputs(need)
        only = [s for s in only if s not in ("tokenizer", "decode")]

    env = environment(device)
    _log(f"{env['cpu']}, torch {env['torch']}, {env['torch_threads']} threads, device {device}")
    ceilings = {}
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        ceilings[precision] = matmul_ceiling(device, dtype, args.quick)["gflops"]
        _log(f"matmul ceiling {precision}: {ceilings[precision]:,.0f} GFLOP/s")

    rows: list[Row] = []
    if {"image", "text"} & set(only):
        from clipforge.bench.embed import embedding_rows
        from clipforge.bench.impls import build

        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            impls = build(name, device)
            for kind in ("image", "text"):
                if kind in only:
                    _log(f"{kind}: {name}")
                    rows += embedding_rows(impls, kind, inputs, args.batch, device, precisions, reps,
                                           max(args.warmup, 1 if args.compile else 0), ceilings, args.compile)
            del impls
            gc.collect()
    if "train" in only:
        from clipforge.bench.impls import build
        from clipforge.bench.train import train_rows

        for name, batch in train_specs:
            _log(f"train: {name} batch {batch}")
            impls = build(name, device)
            rows += train_rows(impls, inputs, batch, device, precisions, reps, args.warmup, ceilings, args.compile)
            del impls
            gc.collect()
    if "tokenizer" in only:
        from clipforge.bench.tokenizers import tokenizer_rows

        _log("tokenizer")
        captions = inputs.all_captions[:2000] if args.quick else inputs.all_captions
        rows += tokenizer_rows(captions, reps, args.warmup)
    if "decode" in only:
        from clipforge.bench.decode import decode_rows

        _log("decode")
        paths = inputs.all_image_paths[: 32 if args.quick else 512]
        rows += decode_rows(paths, [64] if args.quick else [224, 64], reps, args.warmup)
    if "loss" in only:
        from clipforge.bench.memory import loss_memory_rows

        _log("loss memory")
        default = "256,1024" if args.quick else "1024,4096,16384,32768"
        rows += loss_memory_rows([int(s) for s in (args.loss_sizes or default).split(",")])

    report.add_ratios(rows)
    command = "python -m clipforge.bench" + ("" if argv is None and len(sys.argv) < 2 else " ")
    command += shlex.join(argv if argv is not None else sys.argv[1:])
    table = report.markdown(rows, env, ceilings, command.strip())
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "command": command.strip(), "ceilings_gflops": ceilings, "reps": reps,
                   "warmup": args.warmup, "rows": [r.to_dict() for r in rows], "targets": report.targets(rows)}
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
