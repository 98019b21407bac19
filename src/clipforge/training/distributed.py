"""One code path for 1 process and N: torchrun (or SLURM) environment -> process group.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under ``srun`` without torchrun the SLURM variables
are mapped to the same meaning. Gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> World:
    env = os.environ
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()


def pick_device(requested: str, world: World) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            from clipforge.errors import ClipforgeError

            raise ClipforgeError(f"process LOCAL_RANK {world.local_rank} has no GPU of its own (this machine shows "
                                 f"{torch.cuda.device_count()}); start at most that many processes per node")
        return torch.device("cuda", world.local_rank)
    return torch.device(requested)


def init_distributed(world: World, device: torch.device) -> None:
    """Join the process group (no-op for one process). SLURM needs MASTER_ADDR/MASTER_PORT set."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.world_size)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.world_size
    return value


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
