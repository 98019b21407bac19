"""FSDP2 model and optimiser state: full dicts in the plain (DDP) format, and sharded DCP folders.

The full form is what a one-process or DDP run writes: ``model.state_dict()`` and torch's
``optimizer.state_dict()`` (state keyed by int ids numbered across ``param_groups`` in order), with
0-d tensors where the plain model has them. So ``clipforge.load`` reads an FSDP checkpoint and DDP
resumes from it, and FSDP resumes from a DDP one. The sharded form (torch.distributed.checkpoint)
keeps each rank's shards: no rank ever holds the whole state, and another world size can load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clipforge.training.fsdp import SCALAR_PARAMS

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCALAR_STATE_KEYS = ("step",)  # optimiser state entries that are scalars whatever the parameter's shape


def _squeeze(value: Any) -> Any:
    return value.reshape(()) if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == 1 else value


def _unsqueeze(value: Any) -> Any:
    return value.reshape(1) if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain ``model.state_dict()`` gathered on rank 0's CPU (a collective; {} on the other ranks)."""
    model_state = get_model_state_dict(model, options=_FULL)
    return {k: _squeeze(v) if k in SCALAR_PARAMS else v for k, v in model_state.items()}


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Gather the plain-format model and optimiser state dicts on CPU: a collective; empty dicts on ranks but 0."""
    model_state = full_model_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not model_state:
        return {}, {}
    order = [fqn for group in optimizer_state["param_groups"] for fqn in group["params"]]
    ids = {fqn: index for index, fqn in enumerate(order)}
    state = {}
    for fqn in sorted(optimizer_state["state"], key=ids.__getitem__):
        entries = optimizer_state["state"][fqn]
        state[ids[fqn]] = {k: _squeeze(v) for k, v in entries.items()} if fqn in SCALAR_PARAMS else entries
    groups = [{**group, "params": [ids[fqn] for fqn in group["params"]]} for group in optimizer_state["param_groups"]]
    return model_state, {"state": state, "param_groups": groups}


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                          optimizer_state: dict[str, Any]) -> None:
    """Shard plain-format state dicts (every rank passes the whole of them) into the sharded model and optimiser.

    Ids map to parameters by position, as ``Optimizer.load_state_dict`` does.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    saved = [index for group in optimizer_state["param_groups"] for index in group["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the checkpoint's optimiser has {len(saved)} parameters, this run's {len(order)}")
    fqn = dict(zip(saved, order))
    state = {}
    for index, entries in optimizer_state["state"].items():
        if fqn[index] in SCALAR_PARAMS:
            entries = {k: v if k in SCALAR_STATE_KEYS else _unsqueeze(v) for k, v in entries.items()}
        state[fqn[index]] = entries
    groups = [{**group, "params": [fqn[index] for index in group["params"]]}
              for group in optimizer_state["param_groups"]]
    model_state = {k: _unsqueeze(v) if k in SCALAR_PARAMS else v for k, v in model_state.items()}
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def _sharded(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards into folder (a collective); rank 0 adds the metadata last."""
    dcp.save(_sharded(model, optimizer), checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read this rank's shards from a folder save_sharded wrote, at any world size (a collective)."""
    state = _sharded(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
