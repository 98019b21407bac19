"""compile = true: the training model compiled block by block, with a fallback to eager when the compiler fails.

Blocks, not the whole model, because:
  * identical blocks share one compiled graph (ViT-Tiny-32: 2 graphs for its 8 blocks; ViT-B-32's 24
    compile in about the same 40 s on 2 CPU threads, bench/compile_step.py), so depth costs nothing;
  * the text tower trims each batch to its longest caption (``CLIP.encode_text``), a data-dependent
    length the blocks see as one dynamic dimension instead of a graph break and a recompile per length;
  * FSDP2 shards block by block, and the order open_clip and torchtitan use is compile each block, then
    shard it (not tested here with FSDP).
Each block's ``forward`` is compiled in place: module hooks (FSDP2's all-gather and reshard) stay
outside the compiled code, and the model, its ``state_dict`` keys, checkpoints and DDP wrapping are
those of the eager model. A ``copy.deepcopy`` of a compiled model would call the original's blocks:
uncompile first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from clipforge.models.layers import ResidualAttentionBlock
from clipforge.models.modified_resnet import Bottleneck
from clipforge.training.grad_cache import device_rng_state, set_device_rng_state

COMPILED_BLOCKS = (ResidualAttentionBlock, Bottleneck)
T = TypeVar("T")


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks ``compile_model`` compiles: transformer blocks of both towers, ResNet bottlenecks."""
    return [module for module in model.modules() if isinstance(module, COMPILED_BLOCKS)]


def compile_model(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile each block's ``forward`` in place with ``torch.compile`` (lazily: the first call compiles).

    Call it before DDP or FSDP wrapping; with FSDP2, ``fully_shard`` each block after this. Returns ``model``.
    """
    for block in compiled_blocks(model):
        block.forward = torch.compile(block.forward, **compile_kwargs)
    return model


def uncompile_model(model: nn.Module) -> nn.Module:
    """Undo ``compile_model``: every block runs eagerly again. Returns ``model``."""
    for block in compiled_blocks(model):
        if "forward" in vars(block):  # the compiled one shadows the class's
            del block.forward
    return model


def _short(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


class CompiledStep:
    """``step`` (``contrastive_step``) run with ``model`` compiled; on a compiler error, eager for the rest of the run.

    A step that raises (other than running out of memory) warns once, uncompiles the model, zeroes the
    gradients the failed attempt accumulated, restores the RNG and buffers (BatchNorm statistics) to
    their state before it, and runs the same step again eagerly: no update is lost or applied twice.
    Under DDP this assumes every rank fails alike, as a compiler error on identical ranks does.
    Build it before DDP/FSDP wrapping; ``model`` is the unwrapped model (sharded in place is fine).
    """

    def __init__(self, step: Callable[..., T], model: nn.Module) -> None:
        self.step, self.model = step, model
        self.compiled = False
        try:
            compile_model(model)
            self.compiled = True
        except Exception as error:  # noqa: BLE001 - torch.compile unsupported here: eager, with a warning
            self._fall_back(error)

    def _fall_back(self, error: Exception) -> None:
        uncompile_model(self.model)
        self.compiled = False
        warnings.warn(f"compile = true but torch.compile failed ({_short(error)}); training goes on in eager mode, "
                      "which computes the same steps more slowly", stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        if not self.compiled:
            return self.step(*args, **kwargs)
        device = next(self.model.parameters()).device
        rng = device_rng_state(device)
        buffers = [buffer.clone() for buffer in self.model.buffers()]
        try:
            return self.step(*args, **kwargs)
        except torch.OutOfMemoryError:  # not a compiler failure; eager would need more memory still
            raise
        except Exception as error:  # noqa: BLE001 - any compiler failure: redo this step eagerly
            self._fall_back(error)
        self.model.zero_grad(set_to_none=True)
        set_device_rng_state(rng, device)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers):
                buffer.copy_(saved)
        return self.step(*args, **kwargs)


def compiled_training_step(step: Callable[..., T], model: nn.Module, enabled: bool) -> Callable[..., T]:
    """``step`` itself when ``enabled`` is false; else a ``CompiledStep`` (compiles ``model`` now, in place)."""
    return CompiledStep(step, model) if enabled else step
