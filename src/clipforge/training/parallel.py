"""How the model is spread over the processes, as the training loop sees it: one process, DDP or FSDP2.

The loop asks the same questions of every strategy (wrap the model, gather the weights to save,
resume, evaluate, read the temperature, measure memory); only FSDP2 answers them with collectives,
so under FSDP every rank must make each call at the same step. The FSDP modules are imported only
by FSDP runs (torch.distributed.fsdp and .checkpoint take seconds to import).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipforge.models.clip import CLIP
from clipforge.training import checkpointing as ckpt
from clipforge.training.config import TrainConfig
from clipforge.training.distributed import World
from clipforge.training.hooks import EvalHook


class Parallel:
    """DDP (or one process) or, with ``strategy = "fsdp"`` and several processes, FSDP2."""

    def __init__(self, config: TrainConfig, world: World, device: torch.device) -> None:
        self.world, self.device = world, device
        self.precision, self.reshard_after_forward = config.precision, config.fsdp_reshard_after_forward
        self.fsdp = config.strategy == "fsdp" and world.distributed
        self.memory: dict[str, float] = {}
        if config.strategy == "fsdp" and not world.distributed:
            warnings.warn("strategy = \"fsdp\" shards over several processes but this run has one; training "
                          "unsharded (start it with torchrun --nproc_per_node N to shard)")

    @property
    def autocast_precision(self) -> str:
        """Under FSDP the mixed-precision policy casts the weights, so autocast stays off (as open_clip)."""
        return "fp32" if self.fsdp else self.precision

    def shard(self, model: CLIP) -> CLIP:
        """FSDP: shard in place; call before building the optimiser, which must see the sharded parameters."""
        if self.fsdp:
            from clipforge.training import fsdp

            fsdp.shard_model(model, self.device, self.precision, self.reshard_after_forward)
        return model

    def wrap(self, model: CLIP) -> nn.Module:
        """What the training step calls: a DDP wrapper, or the (sharded) model itself."""
        if self.fsdp or not self.world.distributed:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def weights(self, model: CLIP, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """(model, optimiser) state dicts in the plain format, on the main process (None elsewhere).

        Under FSDP a collective: the shards are gathered to the main process's CPU memory.
        """
        if self.fsdp:
            from clipforge.training import fsdp_state

            gathered = fsdp_state.full_state_dicts(model, optimizer)
            return gathered if self.world.is_main else None
        return (model.state_dict(), optimizer.state_dict()) if self.world.is_main else None

    def save_shards(self, model: CLIP, optimizer: torch.optim.Optimizer, output_dir: Path, step: int) -> None:
        """FSDP: step_N.dcp beside step_N.pt (a collective; save_checkpoint(sharded=True) made its staging folder)."""
        if not self.fsdp:
            return
        from clipforge.training import fsdp_state

        dist.barrier()  # the main process has created the staging folder
        fsdp_state.save_sharded(model, optimizer, ckpt.sharded_staging(output_dir, step))
        if self.world.is_main:
            ckpt.publish_sharded(output_dir, step)

    def resume(self, path: Path, model: CLIP, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> dict[str, Any]:
        """Restore a checkpoint into the run; returns its content (counters, rng, ...).

        FSDP reads step_N.dcp when complete (each rank only its shards), else shards step_N.pt (a DDP run's).
        """
        if not self.fsdp:
            state = ckpt.load_checkpoint(path)
            ckpt.restore(state, path, model, optimizer, scaler)
            return state
        from clipforge.training import fsdp_state

        sharded = ckpt.sharded_path(path)
        if ckpt.is_complete_sharded(sharded):
            state = ckpt.load_checkpoint(sharded / ckpt.SHARDED_STATE)
            ckpt.restore(state, sharded, model, optimizer, scaler, required=(),
                         load_weights=lambda _, m, o: _load_dcp(m, o, sharded))
            return state
        state = ckpt.load_checkpoint(path)
        ckpt.restore(state, path, model, optimizer, scaler,
                     load_weights=lambda s, m, o: fsdp_state.load_full_state_dicts(m, o, s["model"], s["optimizer"]))
        return state

    def logit_scale(self, model: CLIP) -> float:
        """exp(logit_scale) clamped, as logged; under FSDP a collective."""
        if self.fsdp:
            from clipforge.training.fsdp import full_logit_scale

            return full_logit_scale(model)
        return model.logit_scale_value().item()

    def evaluate(self, hooks: list[EvalHook], model: CLIP) -> list[dict[str, float]]:
        """The hooks' metrics on the main process ([] elsewhere).

        Under FSDP every rank joins in gathering the weights, and the main process evaluates a plain copy
        built from them (freed afterwards): the hooks then call encode_* on an ordinary CLIP.
        """
        if self.fsdp:
            from clipforge.training import fsdp_state

            state = fsdp_state.full_model_state_dict(model)
            if not self.world.is_main:
                return []
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                model = CLIP(model.config)  # no memory and no random numbers drawn until the weights arrive
            model.load_state_dict(state, assign=True)
            model = model.to(self.device)
        if not hooks:
            return []
        model.eval()
        try:
            return [hook(model) for hook in hooks]
        finally:
            model.train()

    def memory_once(self, model: CLIP, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """memory/params_bytes_per_rank and memory/optimizer_bytes_per_rank, the first time the optimiser has
        state (after the first update), {} before and after; a collective with several processes."""
        if self.memory or not optimizer.state:
            return {}
        self.memory = memory_bytes(model, optimizer)
        return self.memory


def _local_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "to_local"):  # a DTensor: this rank's shard
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes of parameters and optimiser state this rank holds (its shards under FSDP), the most on any rank.

    A collective with several processes; call it on every rank after the first update (Adam's state is lazy).
    """
    params = sum(_local_bytes(p) for p in model.parameters())
    state = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    parts = [(params, state)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [(0, 0)] * dist.get_world_size()
        dist.all_gather_object(parts, (params, state))
    return {"memory/params_bytes_per_rank": float(max(p for p, _ in parts)),
            "memory/optimizer_bytes_per_rank": float(max(s for _, s in parts))}


def _load_dcp(model: CLIP, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """DCP's failures (a BaseException) as a ValueError naming the first one, so restore words them."""
    from torch.distributed.checkpoint.api import CheckpointException

    from clipforge.training import fsdp_state

    try:
        fsdp_state.load_sharded(model, optimizer, folder)
    except CheckpointException as error:
        first = next(iter(error.failures.values()), error)
        raise ValueError(str(first).strip().splitlines()[-1] if str(first).strip() else type(first).__name__) from None
