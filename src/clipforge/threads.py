"""How many CPU threads to compute with: one per physical core this process may use, never more.

Why not torch's default: torch counts the machine's cores, not the ones a container's CPU quota
(cgroup ``cpu.max``) or the affinity mask (``taskset``, SLURM) leaves to this process, and it
knows nothing about other ranks on the node or other jobs on the cores. OpenMP threads that share
a core spin at every barrier: on this project's 2-core machine with one core busy elsewhere, ViT-B/32
text embedding ran 2.4x faster on one thread than on two (README, "Threads").

``default_threads()``: physical cores in the affinity mask, capped by the cgroup quota, divided
among the local ranks (torchrun's ``LOCAL_WORLD_SIZE``). ``"auto"`` also leaves out the cores other
processes are keeping busy, sampled from /proc/stat. ``OMP_NUM_THREADS``, when set, is respected.
Imports no torch (the ONNX runtime path uses it too).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from clipforge.errors import ConfigError

SYS_CPU = Path("/sys/devices/system/cpu")  # module constants, so tests can point them at a fake tree
CGROUP = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None) -> int:
    """Distinct physical cores among ``cpus`` (default: this process's affinity); SMT siblings count once."""
    cpus = _affinity() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topology = SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (not Linux, or hidden): one core per logical CPU
    return max(1, len(cores))


def cgroup_cpu_limit() -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None if unlimited."""
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Processes of this job on this machine (torchrun sets ``LOCAL_WORLD_SIZE``), at least 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def available_cores() -> int:
    """Physical cores this process may use: affinity mask, capped by the cgroup CPU quota."""
    cores = physical_cores()
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.floor(limit)) if limit else cores)


def busy_cores(seconds: float = 0.2) -> float:
    """How many of this process's CPUs other work keeps busy, from two /proc/stat samples."""
    cpus = _affinity()

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        try:
            lines = PROC_STAT.read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                idle = values[3] + values[4]  # idle + iowait
                out[int(name[3:])] = (sum(values), idle)
        return out

    before = sample()
    time.sleep(seconds)
    after = sample()
    busy = 0.0
    for cpu, (total, idle) in after.items():
        if cpu in before and total > before[cpu][0]:
            busy += 1 - (idle - before[cpu][1]) / (total - before[cpu][0])
    return busy


def default_threads() -> int:
    """One thread per available physical core, shared among the local ranks; ``OMP_NUM_THREADS`` wins."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(1, available_cores() // local_processes())


def free_threads() -> int:
    """``"auto"``: like ``default_threads`` but leaving out cores other processes keep busy (rounded)."""
    free = available_cores() - round(busy_cores())
    return max(1, free // local_processes())


def choose_threads(requested: int | str | None) -> int:
    """The thread count for ``--threads`` / ``threads =``: a positive number, ``"auto"``, or None (default)."""
    if requested is None:
        return default_threads()
    if isinstance(requested, str):
        if requested.strip().lower() == "auto":
            return free_threads()
        if not requested.strip().isdigit():
            raise ConfigError(f"threads must be a positive whole number or 'auto', got {requested!r}")
        requested = int(requested)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(f"threads must be a positive whole number or 'auto', got {requested!r}")
    return requested


def apply_torch_threads(requested: int | str | None) -> int:
    """``torch.set_num_threads(choose_threads(requested))``; returns the count."""
    import torch

    count = choose_threads(requested)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
