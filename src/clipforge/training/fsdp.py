"""FSDP2 (``fully_shard``) for CLIP: which modules become shard units, and mixed precision.

Sharding splits each parameter (and so its gradient and Adam moments) along dim 0 over the ranks;
a unit's full weights exist only while it runs. Units are the transformer blocks of both towers and
the ResNet Bottlenecks, then the root (embeddings, projections, norms, the temperature), as open_clip
does. FSDP2 cannot shard a 0-d tensor, so the temperature becomes a [1] parameter while sharded;
``fsdp_state`` turns it back to 0-d in every saved state dict, so checkpoints look like a plain model's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from clipforge.models.clip import MAX_LOGIT_SCALE, CLIP
from clipforge.models.layers import ResidualAttentionBlock
from clipforge.models.modified_resnet import Bottleneck

# Methods called on the root outside ``forward`` (gradient caching embeds with encode_*, reads the scale):
# registered so they gather the root's sharded weights first, as a forward does.
FORWARD_METHODS = ("encode_image", "encode_text", "logit_scale_value")
SCALAR_PARAMS = ("logit_scale",)  # 0-d in a plain CLIP, [1] while sharded


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Compute in bf16/fp16 from fp32 sharded weights and reduce gradients in fp32 (autocast stays off)."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_units(model: CLIP) -> list[nn.Module]:
    """The modules sharded on their own, in forward order within each tower; the root comes last, separately."""
    return [module for module in model.modules() if isinstance(module, (ResidualAttentionBlock, Bottleneck))]


def norm_groups(model: CLIP) -> list[list[nn.Module]]:
    """BatchNorms, per Bottleneck and the stem: sharded apart in fp32 under mixed precision, since batch_norm
    takes bf16/fp16 activations with fp32 weights and statistics but not bf16 weights with fp32 statistics."""
    if model.visual is None:
        return []
    stem = list(model.visual.children())  # ModifiedResNet's own bn1..bn3
    blocks = [list(m.modules()) for m in model.modules() if isinstance(m, Bottleneck)]
    groups = [[m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)] for modules in [stem, *blocks]]
    return [norms for norms in groups if norms]


def _scalars_to_vectors(model: CLIP) -> None:
    for name in SCALAR_PARAMS:
        param = getattr(model, name)
        if param.dim() == 0:
            setattr(model, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))


def shard_model(model: CLIP, device: torch.device, precision: str, reshard_after_forward: bool) -> CLIP:
    """Shard ``model`` in place over all ranks (call before building the optimiser); returns it.

    An explicit mesh of ``device``'s type: on a host with GPUs, gloo on CPU must not pick CUDA (pytorch#132471).
    """
    _scalars_to_vectors(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(precision)
    units = [(norms, MixedPrecisionPolicy()) for norms in norm_groups(model)] if precision != "fp32" else []
    units += [(unit, policy) for unit in shard_units(model)]  # inner first: a unit takes what no inner one holds
    for unit, unit_policy in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=unit_policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root keeps its weights from forward to backward
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def full_logit_scale(model: CLIP) -> float:
    """The temperature multiplier as logged; a collective when sharded (every rank must call it)."""
    scale = model.logit_scale.detach()
    if isinstance(scale, DTensor):
        scale = scale.full_tensor()
    return scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(-1)[0].item()  # as CLIP.logit_scale_value
