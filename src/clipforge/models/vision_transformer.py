"""CLIP's ViT image tower: patch conv, class token, ln_pre (CLIP's extra LayerNorm), ln_post on CLS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import VisionConfig
from clipforge.models.inference_layers import FrozenLinear, InferenceTransformer, float_copy, layer_norm
from clipforge.models.layers import LayerNorm, Transformer


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order, each flattened like a conv kernel.

    A stride-p, p x p convolution is this reshape followed by one matmul. On CPU the matmul is much
    faster than the convolution, above all in backward (ViT-B/32, batch 32, bf16: 14 ms vs 270 ms).
    """
    batch, channels, height, width = x.shape
    gh, gw = height // patch_size, width // patch_size
    x = x.reshape(batch, channels, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, gh * gw, channels * patch_size * patch_size)


def sincos_2d_position_embedding(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE's), with a zero row for the class token: [grid*grid + 1, width]."""
    if width % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4.0))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="xy")  # as numpy.meshgrid(w, h)
    parts = []
    for axis in (rows, cols):
        angles = axis.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1).float()
    return torch.cat([torch.zeros(1, width), table], dim=0)


class AttentionalPooler(nn.Module):
    """Learned queries attend over the tokens (open_clip's CoCa pooler); keys match open_clip's."""

    def __init__(self, output_dim: int, context_dim: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, output_dim))
        self.attn = nn.MultiheadAttention(output_dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = LayerNorm(output_dim)
        self.ln_k = LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class VisionTransformer(nn.Module):
    """CLIP's ViT with open_clip's options (``VisionConfig`` documents each); defaults are OpenAI's."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, mlp_ratio: float = 4.0, quick_gelu: bool = True, config: VisionConfig | None = None):
        super().__init__()
        cfg = config or VisionConfig("vit", image_size, width, layers, heads, patch_size, mlp_ratio)
        self.input_resolution = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.pool_type, self.final_ln_after_pool = cfg.pool_type, cfg.final_ln_after_pool
        self.patch_dropout = cfg.patch_dropout
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        if cfg.pos_embed_type == "sin_cos_2d":
            self.positional_embedding = nn.Parameter(sincos_2d_position_embedding(width, grid), requires_grad=False)
        else:
            self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else LayerNorm(width, eps=cfg.norm_eps)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu, cfg.ls_init_value, cfg.norm_eps,
                                       cfg.gelu_approximate)
        self.attn_pool_type = cfg.attentional_pool
        pool_dim = width
        if cfg.attentional_pool is not False:
            self.attn_pool = AttentionalPooler(output_dim, width, cfg.attn_pooler_heads, cfg.attn_pooler_queries)
            if cfg.attentional_pool in ("parallel", "cascade"):
                self.attn_pool_contrastive = AttentionalPooler(output_dim, width, cfg.attn_pooler_heads, 1)
            pool_dim = output_dim
        self.ln_post = LayerNorm(pool_dim, eps=cfg.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, output_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token and positions, before ln_pre: [B, 1 + g*g, W]."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            x = self.conv1(x).flatten(2).transpose(1, 2)  # the conv drops the remainder; keep that behaviour
        else:
            x = F.linear(patchify(x, self.patch_size), self.conv1.weight.flatten(1))  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """FLIP's patch dropout while training: keep the class token and a random subset of patches."""
        if not self.training or self.patch_dropout <= 0:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        keep = max(1, int(patches.shape[1] * (1 - self.patch_dropout)))
        index = torch.randn(x.shape[0], patches.shape[1], device=x.device).topk(keep, dim=-1).indices
        patches = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls, patches], dim=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, W] tokens -> [B, pool_dim], in open_clip's order of pooling and ln_post."""
        if self.attn_pool_type in ("parallel", "cascade"):
            x = self.ln_post(x)
            source = self.attn_pool(x) if self.attn_pool_type == "cascade" else x
            return self.attn_pool_contrastive(source)[:, 0]
        if self.attn_pool_type is True:
            x = self.ln_post(self.attn_pool(x))
            return x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1)
        if self.final_ln_after_pool:
            return self.ln_post(x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1))
        if self.pool_type == "tok":  # LayerNorm acts per token, so norming only the class token is exact
            return self.ln_post(x[:, 0])
        return self.ln_post(x[:, 1:]).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.ln_pre(self.drop_patches(self.embed(x))))
        return self.pool(x) @ self.proj


class InferenceVisionTransformer(nn.Module):
    """The ViT frozen for inference in ``dtype``: patch embedding as one matmul, fused blocks, and
    only the class token computed after the last attention. Returns float32 features."""

    def __init__(self, vit: VisionTransformer, dtype: torch.dtype):
        super().__init__()
        self.patch_size = vit.patch_size
        self.dtype = dtype
        self.patch_embed = FrozenLinear(vit.conv1.weight.flatten(1), None, dtype)
        self.class_embedding = vit.class_embedding.detach().to(dtype)
        self.positional_embedding = vit.positional_embedding.detach().to(dtype)
        self.ln_pre, self.ln_post = float_copy(vit.ln_pre), float_copy(vit.ln_post)
        self.transformer = InferenceTransformer(vit.transformer, dtype)
        self.proj = vit.proj.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = patchify(x.to(self.dtype), self.patch_size)
        batch, grid, _ = patches.shape
        tokens = self.patch_embed(patches.reshape(batch * grid, -1)).view(batch, grid, -1)
        x = torch.cat([self.class_embedding.expand(batch, 1, -1), tokens], dim=1) + self.positional_embedding
        x = layer_norm(x, self.ln_pre)
        cls = self.transformer(x, pool=torch.zeros(batch, dtype=torch.long, device=x.device))
        return layer_norm(cls.float(), self.ln_post) @ self.proj
