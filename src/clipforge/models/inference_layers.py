"""The frozen inference path (``InferenceTransformer``), built by ``CLIP.for_inference``.

Weights are cast once, oneDNN kernels run with the activation and residual add fused in, text
tokens are packed (padding and repeated prefixes skipped), and only the pooled token is computed
after the last attention. Each piece computes the same function as the block it replaces.
"""

from __future__ import annotations

import copy
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.layers import (
    EXPLICIT_ATTENTION_MAX_LENGTH,
    QuickGELU,
    ResidualAttentionBlock,
    Transformer,
    explicit_attention,
)

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
        explicit = x.device.type == "cpu" and length <= EXPLICIT_ATTENTION_MAX_LENGTH
        if not pool:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            if explicit:
                out = explicit_attention(q, k, v, causal=layout.causal)
            else:
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
            if explicit:
                out = explicit_attention(q, k, v, keep=mask).reshape(batch, width)
            else:
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

    ``shared_prefixes`` goes further for causal text: under a causal mask a token's features depend
    only on the tokens up to it, so sequences that start alike ("a photo of a ...", every [SOT])
    share those rows. Each distinct prefix is one packed row; ``grid_rows`` maps every grid
    position to its prefix's row (or to the zero row past a sequence's end).
    """

    def __init__(self, batch: int, length: int, pool_positions: torch.Tensor, causal: bool,
                 lengths: torch.Tensor | None = None, shared_prefixes: tuple[list[int], list[int]] | None = None):
        self.batch, self.length, self.causal = batch, length, causal
        self.pool_positions = pool_positions
        rows = torch.arange(batch, device=pool_positions.device)
        self.index: torch.Tensor | None = None
        self.grid_rows: torch.Tensor | None = None
        self.pool_rows = rows * length + pool_positions
        self._grid: torch.Tensor | None = None
        if shared_prefixes is not None:
            first, grid_rows = shared_prefixes
            self.index = torch.tensor(first, device=pool_positions.device)
            self.grid_rows = torch.tensor(grid_rows, device=pool_positions.device)
            self.pool_rows = self.grid_rows.index_select(0, self.pool_rows)
        elif lengths is not None:
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
        if self.grid_rows is not None:  # shared prefixes: every position reads its prefix's row
            return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, self.grid_rows)
        if self._grid is None or self._grid.shape[1] != x.shape[1] or self._grid.dtype != x.dtype:
            self._grid = x.new_zeros(self.batch * self.length, x.shape[1])
        return self._grid.index_copy_(0, self.index, x)


def shared_prefixes(ids: torch.Tensor, lengths: torch.Tensor) -> tuple[list[int], list[int]]:
    """(grid position of each distinct prefix's first occurrence, each grid position's prefix row).

    Sequence i's tokens are ``ids[i, :lengths[i]]``; positions past that map to row ``len(first)``,
    the zero row ``TokenLayout.padded`` appends.
    """
    batch, length = ids.shape
    rows: dict[tuple[int, int], int] = {}
    first: list[int] = []
    grid_rows = [-1] * (batch * length)
    for b, (sequence, n) in enumerate(zip(ids.tolist(), lengths.tolist())):
        parent = -1
        for position in range(n):
            key = (parent, sequence[position])
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(first)
                first.append(b * length + position)
            grid_rows[b * length + position] = parent = row
    padding = len(first)
    return first, [padding if r < 0 else r for r in grid_rows]


# Pack text only when padding is at least this fraction of the grid: below it the gathers and
# scatters around every attention cost about what the skipped padding would have.
PACK_MIN_PADDING = 0.1


class InferenceTransformer(nn.Module):
    """A Transformer frozen for inference; returns the features of one pooled position per sequence."""

    def __init__(self, transformer: Transformer, dtype: torch.dtype):
        super().__init__()
        self.resblocks = nn.ModuleList(InferenceBlock(block, dtype) for block in transformer.resblocks)

    def forward(self, x: torch.Tensor, pool: torch.Tensor, causal: bool = False,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, D]; pool: [B] positions whose final features are returned as [B, D].

        With ``causal``, sequence i ends at ``pool[i]`` (its [EOS]); its padding is then skipped,
        and with its token ``ids`` [B, L] so are repeats of prefixes other sequences already have.
        """
        batch, length, _ = x.shape
        lengths = pool + 1 if causal else None
        prefixes = shared_prefixes(ids, lengths) if lengths is not None and ids is not None else None
        if prefixes is not None and len(prefixes[0]) > (1 - PACK_MIN_PADDING) * batch * length:
            prefixes = None
        if lengths is not None and int(lengths.sum()) > (1 - PACK_MIN_PADDING) * batch * length:
            lengths = None
        layout = TokenLayout(batch, length, pool, causal, lengths, prefixes)
        x = layout.pack(x)
        last = len(self.resblocks) - 1
        for index, block in enumerate(self.resblocks):
            x = block(x, layout, pool=index == last)
        return x
