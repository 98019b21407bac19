"""Transformer building blocks shared by the text tower and the ViT image tower.

Parameter names follow OpenAI's release exactly (``attn.in_proj_weight``, ``mlp.c_fc``, ...)
so their checkpoints load without renaming. Attention runs batch-first through
``scaled_dot_product_attention``, which picks a fused kernel where one exists, except when
training short sequences on CPU (see ``attention``).

The frozen inference path built from these blocks (``CLIP.for_inference``) is in
``inference_layers.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, as OpenAI does for fp16 weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# On CPU, PyTorch's fused (flash) attention backward is several times slower than plain
# matmul + softmax for short sequences (ViT-B/32's 50 tokens: 35 ms vs 8 ms per layer in bf16;
# docs/benchmarks.md). Above this length the explicit path's L x L scores cost more than they save.
EXPLICIT_ATTENTION_MAX_LENGTH = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [B, H, L, d]: SDPA, or explicit math when training short CPU sequences.

    ``attn_mask`` is additive (0 or -inf), broadcastable to [B, H, L, L]. The explicit path computes the
    softmax in at least float32, as SDPA does.
    """
    length = q.shape[-2]
    if attn_mask is not None or not (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
                                     and length <= EXPLICIT_ATTENTION_MAX_LENGTH):
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
    return explicit_attention(q, k, v, causal)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """Attention as two batched matmuls and a float32 softmax: on CPU, for the short sequences of
    CLIP (L <= 128), 1.5-1.7x faster than SDPA's flash kernel in bf16, forward and backward.

    ``keep`` (bool, broadcastable to the scores) marks the keys each query may see.
    """
    length = q.shape[-2]
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if causal:
        future = torch.ones(length, k.shape[-2], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, float("-inf"))
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    accumulate = torch.promote_types(scores.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=accumulate).to(v.dtype), v)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout and init."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], causal=causal, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch (CaiT; open_clip's ``ls_init_value``)."""

    def __init__(self, width: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def activation(quick_gelu: bool, gelu_approximate: str = "none") -> nn.Module:
    """QuickGELU (OpenAI's weights) or GELU (open_clip's default for new training)."""
    if quick_gelu:
        if gelu_approximate != "none":
            raise ValueError("gelu_approximate applies to GELU, not QuickGELU")
        return QuickGELU()
    return nn.GELU(approximate=gelu_approximate)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))); ls_* only with layer scale."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = True,
                 ls_init_value: float | None = None, norm_eps: float = 1e-5, gelu_approximate: str = "none"):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width, eps=norm_eps)
        self.attn = SelfAttention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = LayerNorm(width, eps=norm_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", activation(quick_gelu, gelu_approximate)),
            ("c_proj", nn.Linear(hidden, width)),
        ]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of residual attention blocks, optionally gradient-checkpointed."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = True,
                 ls_init_value: float | None = None, norm_eps: float = 1e-5, gelu_approximate: str = "none"):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, ls_init_value, norm_eps, gelu_approximate)
            for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, attn_mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, attn_mask=attn_mask)
        return x

    def init_like_openai_text(self) -> None:
        """OpenAI's scaled init, which its CLIP applies to the text transformer only."""
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
