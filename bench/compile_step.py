"""Training step time on CPU, eager vs ``compile = true`` (blocks compiled by inductor), and the compile time.

One training step is what the loop runs: ``contrastive_step`` (forward, loss, backward) then the fused
AdamW step, on random images and random captions whose lengths vary from batch to batch (the text
tower trims each batch to its longest caption, as with real data). Each model and mode runs in a
fresh process with its own empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so the compile time is
a first run's. compile time = the first compiled step minus the median eager step; step = median of
``--steps`` steps after the first. The machine may be shared: the 1-minute load average is printed
before and after each measurement, and numbers taken under load are slower than on an idle machine.

    OMP_NUM_THREADS=2 python bench/compile_step.py --models ViT-Tiny-32:32 ViT-B-32:32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _batches(model, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for index in range(count):
        images = torch.randn(batch, 3, model.image_size, model.image_size, generator=generator)
        texts = torch.zeros(batch, model.context_length, dtype=torch.long)
        longest = 8 + (index * 7) % (model.context_length - 9)
        for row in range(batch):
            length = int(torch.randint(2, longest + 1, (), generator=generator))
            texts[row, 0] = 49406
            texts[row, 1:length] = torch.randint(1, 49000, (length - 1,), generator=generator)
            texts[row, length] = 49407  # [EOS]: the largest id, where the feature is read
        out.append((images, texts))
    return out


def run_one(model_name: str, batch: int, compiled: bool, steps: int) -> dict[str, float]:
    """Time the first and the next ``steps`` training steps of one model in this process."""
    from clipforge.training.compile_step import compiled_training_step
    from clipforge.training.config import TrainConfig
    from clipforge.training.grad_cache import contrastive_step
    from clipforge.training.loop import build_model
    from clipforge.training.optim import make_optimizer, paper_betas_eps

    model = build_model(TrainConfig(model=model_name, seed=0), torch.device("cpu"))
    betas, eps = paper_betas_eps(model.config.vision.is_resnet, 0.9, None, None)
    optimizer = make_optimizer(model, 1e-5, 0.2, betas, eps)
    step = compiled_training_step(contrastive_step, model, compiled)
    times = []
    for images, texts in _batches(model, batch, steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        result = step(model, images, texts, micro_batch=None)
        optimizer.step()
        times.append(time.perf_counter() - start)
    still_compiled = bool(getattr(step, "compiled", False))
    return {"first_s": times[0], "step_s": statistics.median(times[1:]), "loss": float(result["loss"]),
            "compiled": still_compiled}


def _measure(model_name: str, batch: int, mode: str, steps: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # an empty cache: a first compile
        load_before = os.getloadavg()[0]
        done = subprocess.run([sys.executable, __file__, "--one", model_name, str(batch), mode, str(steps),
                               str(threads)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{model_name} {mode} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-32:32", "ViT-B-32:32"], help="MODEL:BATCH")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, batch, mode, steps, threads = args.one
        torch.set_num_threads(int(threads))
        print(json.dumps(run_one(name, int(batch), mode == "compiled", int(steps))))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s) of {os.cpu_count()} CPUs, "
          f"{args.steps} timed steps after the first; load = 1-minute load average before/after")
    header = f"{'model':<12} {'batch':>5} {'eager step':>11} {'compiled step':>14} {'speedup':>8} " \
             f"{'compile time':>13} {'loss eager/compiled':>22} {'load':>11}"
    print(header)
    print("-" * len(header))
    for spec in args.models:
        name, batch = spec.split(":")
        eager = _measure(name, int(batch), "eager", args.steps, args.threads)
        compiled = _measure(name, int(batch), "compiled", args.steps, args.threads)
        if not compiled["compiled"]:
            print(f"{name}: compilation failed and the step fell back to eager; no compiled numbers")
            continue
        compile_s = compiled["first_s"] - eager["step_s"]
        print(f"{name:<12} {batch:>5} {eager['step_s'] * 1000:>9.0f}ms {compiled['step_s'] * 1000:>12.0f}ms "
              f"{eager['step_s'] / compiled['step_s']:>7.2f}x {compile_s:>12.1f}s "
              f"{eager['loss']:>10.4f}/{compiled['loss']:<10.4f} "
              f"{min(eager['load_before'], compiled['load_before']):>4.1f}-"
              f"{max(eager['load_after'], compiled['load_after']):<4.1f}", flush=True)


if __name__ == "__main__":
    main()
