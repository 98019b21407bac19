"""The torch path against the onnxruntime path of an ONNX export, side by side in one process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/onnx_speed.py                 # ViT-B-32 (random weights), 5 reps
    OMP_NUM_THREADS=2 .venv/bin/python bench/onnx_speed.py --model RN50 --reps 7

ViT-B-32 image embedding of 32 Flickr8k images (preprocessed once, outside the timing: both paths run
the same ``transforms.core`` code) and text embedding of 32 real Flickr8k captions (tokenized once).
Rows: clipforge fp32 eager (``model.encode_*``), ``model.for_inference(torch.float32)`` (what
``clipforge embed`` runs on a CPU without bf16), ``model.for_inference(torch.bfloat16)`` (what its
``--precision auto`` picks on CPUs with AVX-512-BF16/AMX; not float32-exact, so the agreement column
matters), and onnxruntime fp32 on the exported graphs with as many intra-op threads as torch uses.
Repetitions are interleaved (every row once per round) and the median is reported, with the CPU time
per call and the load average before and after, since other jobs may share the cores. The last two
columns compare each row's embeddings with the eager float32 ones (max abs difference, least cosine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"


def _captions(count: int) -> list[str]:
    lines = (FLICKR / "captions.tsv").read_text(encoding="utf-8").splitlines()[1:]
    seen: list[str] = []
    for line in lines:
        text = line.split("\t")[1]
        if text not in seen:
            seen.append(text)
        if len(seen) == count:
            break
    return seen


def _timed(fn) -> tuple[float, float, np.ndarray]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import clipforge
    from clipforge.export import export_onnx
    from clipforge.runtime import OnnxCLIP

    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.safetensors"
        clipforge.save(clipforge.create_model(args.model).eval(), source)
        started = time.perf_counter()
        export_onnx(source, Path(tmp) / "export")
        export_s = time.perf_counter() - started
        model, preprocess = clipforge.load(source)
        fast = model.for_inference(torch.float32)
        bf16 = model.for_inference(torch.bfloat16)
        onnx = OnnxCLIP.load(Path(tmp) / "export", threads=threads)
        images = sorted((FLICKR / "images").glob("*.jpg"))[: args.batch]
        unit = np.stack([onnx.preprocess(p) for p in images])  # [0, 1]; the graph normalises
        pixels = torch.stack([preprocess(p) for p in images])  # normalised, for the torch rows
        captions = _captions(args.batch)
        tokens = model.tokenize(captions)
        ids = onnx.tokenize(captions)

        rows = {
            ("image", "clipforge fp32 eager (encode_image)"): lambda: model.encode_image(pixels, normalize=True),
            ("image", "clipforge for_inference(float32)"): lambda: fast.encode_image(pixels, normalize=True),
            ("image", "clipforge for_inference(bfloat16)"): lambda: bf16.encode_image(pixels, normalize=True),
            ("image", f"onnxruntime fp32 ({threads} intra-op threads)"): lambda: onnx.encode_image_pixels(unit),
            ("text", "clipforge fp32 eager (encode_text)"): lambda: model.encode_text(tokens, normalize=True),
            ("text", "clipforge for_inference(float32)"): lambda: fast.encode_text(tokens, normalize=True),
            ("text", "clipforge for_inference(bfloat16)"): lambda: bf16.encode_text(tokens, normalize=True),
            ("text", f"onnxruntime fp32 ({threads} intra-op threads)"): lambda: onnx.encode_tokens(ids),
        }
        walls: dict = {key: [] for key in rows}
        cpus: dict = {key: [] for key in rows}
        outputs: dict = {}
        with torch.no_grad():
            for key, fn in rows.items():  # warm-up, and the outputs for the agreement column
                out = fn()
                outputs[key] = out.float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            for _ in range(args.reps):
                for key, fn in rows.items():
                    wall, cpu, _ = _timed(fn)
                    walls[key].append(wall)
                    cpus[key].append(cpu)
    load_after = os.getloadavg()

    print(f"{args.model} (random weights), batch {args.batch}; torch {torch.__version__} with {threads} threads, "
          f"onnxruntime {__import__('onnxruntime').__version__}; export took {export_s:.1f} s; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs\n")
    print("| tower | path | median ms / batch | items/s | CPU s / call | max abs diff vs eager | min cosine |")
    print("|---|---|---|---|---|---|---|")
    for (tower, name), times in walls.items():
        median = statistics.median(times)
        reference = outputs[(tower, f"clipforge fp32 eager (encode_{tower})")]
        diff = float(np.abs(outputs[(tower, name)] - reference).max())
        cosine = float((outputs[(tower, name)].astype(np.float64) * reference).sum(1).min())
        print(f"| {tower} | {name} | {median * 1000:.1f} | {args.batch / median:.1f} | "
              f"{statistics.median(cpus[(tower, name)]):.2f} | {diff:.1e} | {cosine:.6f} |")
    print(f"\n{args.reps} interleaved repetitions per row; command: {' '.join([Path(sys.executable).name] + sys.argv)}")


if __name__ == "__main__":
    main()
