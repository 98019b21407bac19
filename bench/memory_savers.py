"""Bytes per parameter of the paper's memory savers: bf16 Adam moments, and those plus a bf16 text tower.

For each model and setting: build the model as training does (``build_model``), the optimiser as
training does (``make_optimizer``), run one forward/backward/step on a batch of random images and
token ids, then sum ``nbytes`` of the actual tensors: weights (parameters and buffers), gradients,
and optimiser state (moments, step counters, the rounding generator's state). Bytes per parameter
divide by the number of trainable parameters. The optimiser step time is the median of 3 further
steps (CPU, ``--threads``); the machine may be busy, so the load average is printed with it.
``LowPrecisionAdamW`` also holds a fixed scratch of float32/int chunks, reported on its own.

    OMP_NUM_THREADS=2 python bench/memory_savers.py --models ViT-Tiny-32 ViT-B-32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from clipforge.training.config import TrainConfig
from clipforge.training.loop import build_model
from clipforge.training.optim import make_optimizer, paper_betas_eps

SETTINGS = {"fp32": ("fp32", "fp32"), "bf16 moments": ("bf16", "fp32"), "bf16 moments + bf16 text": ("bf16", "bf16")}


def _bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def measure(model_name: str, state_dtype: str, text_dtype: str, batch: int) -> dict[str, float]:
    """One setting's bytes (weights, grads, optimiser state, scratch) and optimiser step time."""
    config = TrainConfig(model=model_name, optimizer_state_dtype=state_dtype, text_weights_dtype=text_dtype)
    model = build_model(config, torch.device("cpu"))
    betas, eps = paper_betas_eps(model.config.vision.is_resnet, config.beta1, config.beta2, config.eps)
    optimizer = make_optimizer(model, 1e-4, 0.2, betas, eps, state_dtype=state_dtype, seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=generator)
    texts = torch.randint(1, 49000, (batch, model.context_length), generator=generator)
    image_features, text_features, scale = model(images, texts, return_features=True)
    (scale * (image_features @ text_features.T)).logsumexp(1).mean().backward()
    optimizer.step()
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    state = [value for entry in optimizer.state.values() for value in entry.values()]
    scratch = getattr(getattr(optimizer, "_scratch", None), "_buffers", {}).values()
    count = sum(p.numel() for p in params)
    return {"params": count, "weights": (_bytes(model.parameters()) + _bytes(model.buffers())) / count,
            "grads": _bytes(p.grad for p in params) / count, "state": _bytes(state) / count,
            "scratch_mib": _bytes(scratch) / 2**20, "step_ms": statistics.median(times) * 1000,
            "optimizer": type(optimizer).__name__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-32", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=2, help="pairs in the training step (memory does not depend on it)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f} "
          f"(1 min) on {os.cpu_count()} CPUs")
    header = (f"{'model':<12} {'setting':<26} {'params':>11} {'weights':>8} {'grads':>6} {'state':>6} "
              f"{'w+state':>8} {'w+g+state':>9} {'scratch':>8} {'opt step':>9}  optimizer")
    print("bytes per trainable parameter; scratch in MiB; opt step = median of 3 optimizer.step() calls")
    print(header)
    print("-" * len(header))
    for name in args.models:
        for label, (state_dtype, text_dtype) in SETTINGS.items():
            row = measure(name, state_dtype, text_dtype, args.batch)
            print(f"{name:<12} {label:<26} {row['params']:>11,} {row['weights']:>8.2f} {row['grads']:>6.2f} "
                  f"{row['state']:>6.2f} {row['weights'] + row['state']:>8.2f} "
                  f"{row['weights'] + row['grads'] + row['state']:>9.2f} {row['scratch_mib']:>8.1f} "
                  f"{row['step_ms']:>7.0f}ms  {row['optimizer']}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
