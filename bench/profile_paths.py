"""Where the time goes: torch.profiler self-CPU shares of clipforge's and open_clip's fastest eager paths.

The ViT-B/32 image tower (clipforge ``for_inference(bf16)`` and open_clip ``pure_bf16``, batch 32) and
clipforge's bf16 text tower on 32 Flickr8k captions, with the same random weights as the speed suite.
docs/benchmarks.md ("What bounds the misses") quotes its output.

    OMP_NUM_THREADS=2 python bench/profile_paths.py
"""

from __future__ import annotations

import copy

import torch
from torch.profiler import profile

import clipforge
from clipforge.bench.common import default_data_dir, load_inputs, random_inputs
from clipforge.bench.embed import pixels
from clipforge.bench.impls import build


def report(name: str, fn, calls: int = 3, top: int = 9) -> None:
    fn()  # warm-up
    with torch.inference_mode(), profile() as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"== {name}: {total / calls / 1e3:.0f} ms self CPU per call")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"   {event.key:55s} {event.self_cpu_time_total / total:6.1%}  {event.count // calls:4d} calls")


def main() -> None:
    impls = build("ViT-B-32-quickgelu", torch.device("cpu"), hf=False)
    inputs = load_inputs(default_data_dir(), 32) or random_inputs(32)
    images = pixels(inputs, impls.clipforge.image_size, 32)
    ids = clipforge.tokenize(inputs.captions[:32], truncate=True)
    fast = impls.clipforge.for_inference(torch.bfloat16)
    report("clipforge image for_inference(bf16)", lambda: fast.encode_image(images))
    if impls.open_clip is not None:
        oc16 = copy.deepcopy(impls.open_clip).to(torch.bfloat16)
        report("open_clip image pure_bf16", lambda: oc16.encode_image(images.to(torch.bfloat16)))
    report("clipforge text for_inference(bf16)", lambda: fast.encode_text(ids))


if __name__ == "__main__":
    main()
