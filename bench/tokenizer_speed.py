"""Captions/second of clipforge's tokenizer vs OpenAI, Hugging Face and open_clip on Flickr8k.

Headline: **cold**, a new tokenizer instance (empty caches) per repetition, on the first 5,000
caption rows of flickr8k/captions.tsv (column ``caption``); construction is timed apart and not in
the cold figure; **warm** (the same instance on the same captions again) beside it. A second table
covers all 40,455 captions. Medians of --reps repetitions, interleaved between tokenizers in one
process; each run records the 1-minute load average and the process CPU time. "same ids" checks
the cold and warm output against OpenAI's ``clip.tokenize`` (HF is compared up to its first [EOS]).

    python bench/tokenizer_speed.py --json out/tokenizer_speed.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TSV = ROOT.parent / "shared/data/flickr8k/captions.tsv"


def load_captions(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f, delimiter="\t")]


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("torch", "transformers", "tokenizers", "open_clip", "clip", "numpy", "regex", "ftfy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except ImportError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=Path, default=DEFAULT_TSV, help="TSV with a 'caption' column")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per tokenizer (median)")
    parser.add_argument("--headline-only", action="store_true", help="only the first 5,000 captions")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if not args.captions.exists():
        print(f"captions file not found: {args.captions}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
    from clipforge.bench.tokenizers import HEADLINE_CAPTIONS, markdown_table, run_all

    texts = load_captions(args.captions)
    if args.headline_only:
        texts = texts[:HEADLINE_CAPTIONS]
    load_start, cpu_start, started = os.getloadavg(), time.process_time(), time.strftime("%Y-%m-%d %H:%M %Z")
    by_size, skipped = run_all(texts, args.reps)
    load_end, cpu_total = os.getloadavg(), time.process_time() - cpu_start
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    versions = _versions()
    print(f"\n{started}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f"; median of {args.reps} interleaved runs; "
          f"load average (1, 5, 15 min) {tuple(round(x, 2) for x in load_start)} at start, "
          f"{tuple(round(x, 2) for x in load_end)} at end; process CPU time {cpu_total:.1f} s")
    for size, results in by_size.items():
        which = "first 5,000 caption rows" if size == HEADLINE_CAPTIONS else f"all {size:,} captions"
        print(f"\n### Flickr8k, {which} (cold = new instance; construction timed apart)\n")
        print(markdown_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"date": started, "captions_file": str(args.captions), "reps": args.reps, "cpus": os.cpu_count(),
                   "python": platform.python_version(), "versions": versions,
                   "load_average_start": load_start, "load_average_end": load_end, "process_cpu_s": cpu_total,
                   "skipped": skipped, "results": {str(size): r for size, r in by_size.items()}}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
