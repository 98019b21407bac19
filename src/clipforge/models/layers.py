"""Transformer building blocks shared by the text tower and the ViT image tower.

Parameter names follow OpenAI's release exactly (``attn.in_proj_weight``, ``mlp.c_fc``, ...)
so their checkpoints load without renaming. Attention runs batch-first through
``scaled_dot_product_attention``, which picks a fused kernel where one exists, except when
training short sequences on CPU (see ``attention``).

The second half of the file is the frozen inference path (``InferenceTransformer``): weights
cast once, oneDNN kernels with the activation and residual add fused in, and only the pooled
token computed after the last attention. ``CLIP.for_inference`` builds it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import cache

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
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if causal:
        future = torch.ones(length, k.shape[-2], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, float("-inf"))
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



# ---------------------------------------------------------------- frozen inference path

QUICK_GELU_SCALE = 1.702  # QuickGELU(x) = x * sigmoid(1.702 x) = silu(1.702 x) / 1.702


@cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this build runs oneDNN's fused linear/conv ops (``torch.ops.mkldnn``) for ``dtype`` on CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        x, w = torch.ones(2, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "swish", [], "")
        torch.ops.mkldnn._linear_pointwise.binary(x, out, w, None, "add")
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class FrozenLinear:
    """y = act(x W^T + b) [+ residual] with weights cast (and on CPU pre-packed for oneDNN) once.

    oneDNN applies the activation or the residual add as a post-op of the matmul, so the
    [tokens, width] activations are written once instead of three times. ``activation`` is
    None, "swish" (x * sigmoid(x)) or "gelu" (exact, erf). Elsewhere (CUDA, builds without
    oneDNN) the same math runs as ``F.linear`` and an elementwise op.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 activation: str | None = None):
        weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.activation = activation
        self.onednn = weight.device.type == "cpu" and onednn_available(dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.onednn else weight
        self.plain_weight = weight  # the residual-add kernel takes an unpacked weight
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.plain_weight, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation or "none", [],
                                                      "none" if self.activation == "gelu" else "")
        y = F.linear(x, self.plain_weight, self.bias)
        if self.activation == "swish":
            y = F.silu(y)
        elif self.activation == "gelu":
            y = F.gelu(y)
        return y if residual is None else y.add_(residual)


def float_copy(module: nn.Module) -> nn.Module:
    """A detached float32 copy (for LayerNorms kept in float32 next to low-precision matmuls)."""
    return copy.deepcopy(module).float().requires_grad_(False)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm statistics and affine in float32, output in x's dtype (no float32 copy of x on CPU)."""
    weight, bias = norm.weight, norm.bias
    if x.device.type == "cpu":  # CPU's kernel takes bf16 input with float32 parameters and accumulates in float32
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


class InferenceBlock(nn.Module):
    """A ResidualAttentionBlock frozen for inference, computing the same function.

    QuickGELU is folded into the weights: c_fc is scaled by 1.702 so that oneDNN's fused swish
    gives 1.702 * QuickGELU, and c_proj by 1/1.702 to undo it. The two residual adds are fused
    into out_proj and c_proj.
    """

    def __init__(self, block: ResidualAttentionBlock, dtype: torch.dtype):
        super().__init__()
        self.ln_1, self.ln_2 = float_copy(block.ln_1), float_copy(block.ln_2)
        self.heads = block.attn.heads
        attn, mlp = block.attn, block.mlp
        self.qkv = FrozenLinear(attn.in_proj_weight, attn.in_proj_bias, dtype)
        self.out_proj = FrozenLinear(attn.out_proj.weight, attn.out_proj.bias, dtype)
        c_fc_w, c_fc_b, c_proj_w = mlp.c_fc.weight.float(), mlp.c_fc.bias.float(), mlp.c_proj.weight.float()
        if isinstance(mlp.gelu, QuickGELU):
            c_fc_w, c_fc_b, c_proj_w, act = c_fc_w * QUICK_GELU_SCALE, c_fc_b * QUICK_GELU_SCALE, c_proj_w / QUICK_GELU_SCALE, "swish"
        else:
            act = "gelu"
        self.c_fc = FrozenLinear(c_fc_w, c_fc_b, dtype, activation=act)
        self.c_proj = FrozenLinear(c_proj_w, mlp.c_proj.bias, dtype)

    def forward(self, x: torch.Tensor, layout: TokenLayout, pool: bool = False) -> torch.Tensor:
        """x: [T, D], the layout's tokens. With ``pool``, return only the pooled rows, [B, D]: after
        the last attention nothing else is needed, so out_proj and the MLP run on B rows, not T."""
        batch, length, width = layout.batch, layout.length, x.shape[1]
        qkv = layout.padded(self.qkv(layer_norm(x, self.ln_1))).view(batch, length, 3, self.heads, width // self.heads)
        if not pool:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal)
            out = layout.packed(out.transpose(1, 2).reshape(batch * length, width))
            residual = x
        else:
            positions = layout.pool_positions
            q = qkv[torch.arange(batch, device=x.device), positions, 0].unsqueeze(2)  # [B, H, 1, d]
            k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
            mask = None
            if layout.causal:  # the pooled query at position p sees keys 0..p
                mask = (torch.arange(length, device=x.device) <= positions[:, None]).view(batch, 1, 1, length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(batch, width)
            residual = x.index_select(0, layout.pool_rows)
        h = self.out_proj(out, residual=residual)
        return self.c_proj(self.c_fc(layer_norm(h, self.ln_2)), residual=h)


class TokenLayout:
    """Where each sequence's tokens sit: all B x L of them (dense), or only the first ``lengths[i]``
    of sequence i, packed back to back (causal text: what follows [EOS] never reaches it).

    Linear layers and norms act per token, so they run on the packed [T, D] rows; attention
    scatters them into a zero-padded [B, L] grid (positions past a sequence's end are seen only by
    its discarded later positions) and gathers the result back.
    """

    def __init__(self, batch: int, length: int, pool_positions: torch.Tensor, causal: bool,
                 lengths: torch.Tensor | None = None):
        self.batch, self.length, self.causal = batch, length, causal
        self.pool_positions = pool_positions
        rows = torch.arange(batch, device=pool_positions.device)
        self.index: torch.Tensor | None = None
        self.pool_rows = rows * length + pool_positions
        self._grid: torch.Tensor | None = None
        if lengths is not None:
            valid = torch.arange(length, device=lengths.device) < lengths[:, None]
            self.index = valid.flatten().nonzero().squeeze(1)
            self.pool_rows = torch.cumsum(lengths, 0) - lengths + pool_positions

    @property
    def tokens(self) -> int:
        return self.batch * self.length if self.index is None else self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [T, D]."""
        flat = x.reshape(self.batch * self.length, x.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)

    def packed(self, grid: torch.Tensor) -> torch.Tensor:
        """[B * L, C] -> [T, C]."""
        return grid if self.index is None else grid.index_select(0, self.index)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [B * L, C], reusing one zeroed grid for every layer."""
        if self.index is None:
            return x
        if self._grid is None or self._grid.shape[1] != x.shape[1] or self._grid.dtype != x.dtype:
            self._grid = x.new_zeros(self.batch * self.length, x.shape[1])
        return self._grid.index_copy_(0, self.index, x)


# Pack text only when padding is at least this fraction of the grid: below it the gathers and
# scatters around every attention cost about what the skipped padding would have.
PACK_MIN_PADDING = 0.1


class InferenceTransformer(nn.Module):
    """A Transformer frozen for inference; returns the features of one pooled position per sequence."""

    def __init__(self, transformer: Transformer, dtype: torch.dtype):
        super().__init__()
        self.resblocks = nn.ModuleList(InferenceBlock(block, dtype) for block in transformer.resblocks)

    def forward(self, x: torch.Tensor, pool: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x: [B, L, D]; pool: [B] positions whose final features are returned as [B, D].

        With ``causal``, sequence i ends at ``pool[i]`` (its [EOS]); its padding is then skipped.
        """
        batch, length, _ = x.shape
        lengths = pool + 1 if causal else None
        if lengths is not None and int(lengths.sum()) > (1 - PACK_MIN_PADDING) * batch * length:
            lengths = None
        layout = TokenLayout(batch, length, pool, causal, lengths)
        x = layout.pack(x)
        last = len(self.resblocks) - 1
        for index, block in enumerate(self.resblocks):
            x = block(x, layout, pool=index == last)
        return x
