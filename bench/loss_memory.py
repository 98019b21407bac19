"""Peak memory and time of the contrastive loss and of a whole training step, chunked/cached vs naive.

Loss: forward+backward of ``clip_loss`` (chunked, default chunk) vs ``naive_clip_loss`` (full N x N
logits) on random L2-normalised float32 features, CPU. Step: one ``contrastive_step`` on ViT-Tiny-32
(32 px random images, random 32-token texts) with ``--micro-batch`` vs a naive full-batch
forward/backward. Every measurement runs in a fresh subprocess; peak = the kernel's resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once inputs exist) minus the
resident set at that moment, so it counts only what the measured call allocates. Time: the median of
up to 3 runs (fewer when one run is slow), wall and CPU. A naive case is skipped when the extrapolation from the
largest measured size (quadratic in N for the loss, linear for the step) exceeds ``--max-gib``.

    python bench/loss_memory.py --json out/loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

MIB = 2 ** 20


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _measure(fn, budget_s: float = 20.0) -> dict[str, float]:
    """Peak extra resident memory of the first call; median wall and CPU time (all threads) of up to 3 calls.

    CPU time is reported too because wall time on a shared machine includes other jobs' load.
    """
    fn()  # warm up on tiny inputs: a full-size warm-up would already hold the peak
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    times: list[float] = []
    cpu_times: list[float] = []
    while not times or (len(times) < 3 and sum(times) + times[0] < budget_s):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn.full()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if len(times) == 1:
            peak_mib = (_status_kib("VmHWM") - before) / 1024
    return {"peak_mib": peak_mib, "seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times)}


class _Case:
    """``__call__`` runs the case on tiny inputs (warm-up); ``full`` on the measured size."""

    def __init__(self, kind: str, method: str, batch: int, args: argparse.Namespace):
        from clipforge.training.loss import clip_loss, naive_clip_loss

        torch.manual_seed(0)
        self.kind, self.method, self.args = kind, method, args
        self.loss_fn = clip_loss if method == "chunked" else naive_clip_loss
        if kind == "loss":
            make = lambda n: [torch.nn.functional.normalize(torch.randn(n, args.dim), dim=-1) for _ in range(2)]
            self.small, self.inputs = make(16), make(batch)
        else:
            import clipforge

            self.model = clipforge.create_model("ViT-Tiny-32")
            def make(n: int) -> list[torch.Tensor]:  # full 32-token texts, [EOS] (largest id) last
                texts = torch.randint(1, 49407, (n, 32))
                texts[:, -1] = 49407
                return [torch.randn(n, 3, 32, 32), texts]

            self.small, self.inputs = make(16), make(batch)

    def __call__(self) -> None:
        self._run(*self.small)

    def full(self) -> None:
        self._run(*self.inputs)

    def _run(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.kind == "loss":
            image, text = a.clone().requires_grad_(), b.clone().requires_grad_()
            scale = torch.tensor(1 / 0.07, requires_grad=True)
            self.loss_fn(image, text, scale).backward()
            return
        from clipforge.training.grad_cache import contrastive_step

        self.model.zero_grad(set_to_none=True)
        if self.method == "chunked":
            contrastive_step(self.model, a, b, micro_batch=self.args.micro_batch)
        else:
            m = self.model
            image, text = m.encode_image(a, normalize=True), m.encode_text(b, normalize=True)
            self.loss_fn(image, text, m.logit_scale_value()).backward()


def _child(args: argparse.Namespace) -> None:
    kind, method, batch = args.child
    result = _measure(_Case(kind, method, int(batch), args))
    print(json.dumps(result))


def _run_case(kind: str, method: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, method, str(batch), "--dim", str(args.dim),
               "--micro-batch", str(args.micro_batch)]
    out = subprocess.run(command, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_limit_gib(args: argparse.Namespace) -> float:
    """--max-gib, or less when this machine has less free: a naive case must not swap or be OOM-killed."""
    available_kib = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return min(args.max_gib, 0.8 * available_kib / MIB)


def run_group(kind: str, sizes: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows, limit = [], _memory_limit_gib(args)
    fit: tuple[int, float] | None = None  # (batch, peak MiB) of the largest naive case measured
    power = 2 if kind == "loss" else 1
    for batch in sizes:
        row: dict[str, Any] = {"group": kind, "batch": batch, "chunked": _run_case(kind, "chunked", batch, args)}
        need_gib = fit[1] * (batch / fit[0]) ** power / 1024 if fit else 0.0
        if need_gib > limit:
            row["naive"] = {"skipped": f"skipped (would need ~{need_gib:.1f} GiB)"}
        else:
            row["naive"] = _run_case(kind, "naive", batch, args)
            if "peak_mib" in row["naive"]:
                fit = (batch, row["naive"]["peak_mib"])
        rows.append(row)
        print(f"  {kind} {batch}: {row}", file=sys.stderr, flush=True)
    return rows


def _cell(result: dict[str, Any]) -> tuple[str, str]:
    if "skipped" in result:
        return result["skipped"], "-"
    if "error" in result:
        return f"failed: {result['error'][:60]}", "-"
    return f"{result['peak_mib']:,.0f} MiB", f"{result['seconds']:.3f} s ({result['cpu_seconds']:.3f} s CPU)"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = (f"CPU float32, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}, {platform.machine()}; loss: embed dim {args.dim}; "
              f"step: ViT-Tiny-32, micro-batch {args.micro_batch}")
    lines = [header, "", "| what | batch | clipforge peak | clipforge time | naive peak | naive time |",
             "|---|---:|---:|---:|---:|---:|"]
    names = {"loss": "loss fwd+bwd (chunked vs full N x N)",
             "step": f"training step (grad cache, micro {args.micro_batch} vs full batch)"}
    for row in rows:
        cells = _cell(row["chunked"]) + _cell(row["naive"])
        lines.append(f"| {names[row['group']]} | {row['batch']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 4096, 8192, 16384, 32768],
                        help="global batch sizes for the loss")
    parser.add_argument("--step-sizes", type=int, nargs="*", default=[256, 1024, 4096],
                        help="batch sizes for the training step")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=128)
    parser.add_argument("--max-gib", type=float, default=16.0, help="skip naive cases expected to need more")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    rows = run_group("loss", args.sizes, args) + run_group("step", args.step_sizes, args)
    print(markdown(rows, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                         "dim": args.dim, "micro_batch": args.micro_batch}, indent=2))


if __name__ == "__main__":
    main()
