"""Peak memory of the contrastive loss (forward + backward) against batch size (from bench/loss_memory.py).

Each case runs in a fresh subprocess on seeded, L2-normalised float32 features [N, dim]: clipforge's
``clip_loss`` (never more than ``chunk x N`` logits), the naive full N x N loss, and open_clip's
``ClipLoss``. Peak = the kernel's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist) minus the resident set at that moment, so it
counts only what the loss allocates. A case whose quadratic extrapolation from the largest
measured one exceeds the memory limit is skipped, not run. Linux only (reads /proc).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clipforge.bench.common import Row

METHODS = ("clipforge clip_loss (chunked)", "naive N x N", "open_clip ClipLoss")


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _features(n: int, dim: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1).requires_grad_()
            for _ in range(2)]


def _loss(method: str, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from clipforge.training.loss import clip_loss, naive_clip_loss

    if method == METHODS[0]:
        return clip_loss(image, text, scale)
    if method == METHODS[1]:
        return naive_clip_loss(image, text, scale)
    import open_clip

    return open_clip.ClipLoss()(image, text, scale)


def child(method: str, n: int, dim: int) -> dict[str, Any]:
    """Run in a subprocess: warm up on a tiny batch, then measure one full-size forward + backward."""
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    _loss(method, *_features(8, dim), scale).backward()
    image, text = _features(n, dim)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = _loss(method, image, text, scale)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024, "seconds": seconds, "loss": float(loss)}


def _run(method: str, n: int, dim: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "clipforge.bench.memory", method, str(n), str(dim)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _limit_mib(max_gib: float) -> float:
    available = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024
    return min(max_gib * 1024, 0.5 * available)  # never push the machine (others share it) into swap


def loss_memory_rows(sizes: list[int], dim: int = 512, max_gib: float = 8.0) -> list[Row]:
    if not Path("/proc/self/clear_refs").exists():
        return []
    rows, limit = [], _limit_mib(max_gib)
    fitted: dict[str, tuple[int, float]] = {}
    for n in sizes:
        results: dict[str, dict[str, Any]] = {}
        for method in METHODS:
            if method in fitted and fitted[method][1] * (n / fitted[method][0]) ** 2 > limit:
                results[method] = {"skipped": f"would need ~{fitted[method][1] * (n / fitted[method][0]) ** 2 / 1024:.1f} GiB"}
                continue
            results[method] = _run(method, n, dim)
            if "peak_mib" in results[method] and method != METHODS[0]:
                fitted[method] = (n, max(results[method]["peak_mib"], 1.0))
        naive = results[METHODS[1]].get("loss")
        for method, result in results.items():
            if "peak_mib" not in result:
                rows.append(Row(section="loss", model=f"batch {n:,}", precision="fp32", impl=method, value=float("nan"),
                                unit="MiB peak", note=result.get("skipped") or result.get("error", "")))
                continue
            agree = abs(result["loss"] - naive) / abs(naive) if naive else None
            rows.append(Row(section="loss", model=f"batch {n:,}", precision="fp32", impl=method,
                            value=result["peak_mib"], unit="MiB peak", seconds=[result["seconds"]], agree_ref=agree,
                            note=f"fwd+bwd {result['seconds']:.3f} s; agreement = relative loss difference from naive"))
    return rows


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
