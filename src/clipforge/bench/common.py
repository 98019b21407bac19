"""Timing, the measured matmul ceiling, environment facts and the benchmark's inputs."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import clipforge


@dataclass
class Row:
    """One measured figure: what ran, how fast, and how close its output is to the reference."""

    section: str
    model: str
    precision: str
    impl: str
    value: float
    unit: str
    seconds: list[float] = field(default_factory=list)
    flops: float | None = None  # per item (image, text, sample); see flops.py
    mfu: float | None = None
    vs_open_clip: float | None = None
    vs_hf: float | None = None
    agree_ref: float | None = None  # cosine (or id/pixel agreement) against clipforge's float32 reference
    agree_open_clip: float | None = None
    note: str = ""
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of each timed call (all threads)
    load: float | None = None  # mean 1-minute load average while this row was timed (others' work included)
    compile_seconds: float | None = None  # the first (compiling) call of a torch.compile row, not in ``value``

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN, for a skipped case, becomes null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def default_data_dir() -> Path:
    """../shared/data next to the repository (src/clipforge/__init__.py -> repo root -> its parent)."""
    return Path(clipforge.__file__).resolve().parents[2].parent / "shared" / "data"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@dataclass
class Timing:
    """What ``interleaved`` saw besides wall time: CPU seconds per call and the load around each call."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    load: dict[str, list[float]] = field(default_factory=dict)

    def mean_load(self, name: str) -> float | None:
        values = self.load.get(name)
        return statistics.fmean(values) if values else None


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device,
                timing: Timing | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` times, after ``warmup`` untimed calls.

    Each repetition runs every function once, in a rotating order, so a burst of load from
    another process lands on all implementations rather than on one. ``timing``, if given,
    receives each call's process CPU time and the load average, to show how busy the machine was.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            sync(device)
            cpu, start = time.process_time(), time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if timing is not None:
                timing.cpu.setdefault(name, []).append(time.process_time() - cpu)
                if (load := load_average()) is not None:
                    timing.load.setdefault(name, []).append(load)
    return times


def first_call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call: for a compiled function, the compilation (plus one run)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, Any]:
    """The best GFLOP/s of large square GEMMs (torch.mm, and oneDNN with a pre-packed weight on CPU).

    This is what the machine delivers now, not a datasheet figure, so MFU = achieved / this.
    """
    sizes = (512, 1024) if quick else (1024, 2048, 4096)
    best, per_size = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        fns: dict[str, Callable[[], Any]] = {"mm": lambda a=a, b=b: torch.mm(a, b)}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            from clipforge.models.inference_layers import onednn_available

            if onednn_available(dtype):
                packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), None)
                fns["onednn"] = lambda a=a, w=packed: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        times = interleaved(fns, reps=3 if quick else 5, warmup=1, device=device)
        rates = {name: 2 * n ** 3 / median(t) / 1e9 for name, t in times.items()}
        per_size[n] = rates
        best = max(best, *rates.values())
    return {"gflops": best, "per_size": per_size}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in ("open_clip", "transformers", "PIL"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


@dataclass
class Inputs:
    """The same 32 Flickr8k pairs for everyone: image files and their captions."""

    image_paths: list[Path]
    captions: list[str]
    all_captions: list[str]  # every caption, for the tokenizer
    all_image_paths: list[Path]


def load_inputs(data_dir: Path, batch: int, seed: int = 0) -> Inputs | None:
    """A seeded sample of ``batch`` (image, caption) pairs, or None if the data folder is absent."""
    tsv = data_dir / "flickr8k" / "captions.tsv"
    if not tsv.is_file():
        return None
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    folder = data_dir / "flickr8k" / "images"
    pairs = random.Random(seed).sample(rows, batch)
    images = sorted({row[0] for row in rows})
    return Inputs([folder / p[0] for p in pairs], [p[1] for p in pairs], [r[1] for r in rows],
                  [folder / name for name in images])


def random_inputs(batch: int, seed: int = 0) -> Inputs:
    """Stand-in captions when Flickr8k is absent (images are then random tensors)."""
    rng = random.Random(seed)
    words = ["a", "dog", "cat", "man", "woman", "child", "runs", "jumps", "on", "the", "grass", "in", "park", "with",
             "red", "blue", "ball", "water"]
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + " ." for _ in range(batch)]
    return Inputs([], captions, captions, [])
