"""CLIP's ViT image tower: patch conv, class token, ln_pre (CLIP's extra LayerNorm), ln_post on CLS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.layers import (
    FrozenLinear,
    InferenceTransformer,
    LayerNorm,
    Transformer,
    float_copy,
    layer_norm,
)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order, each flattened like a conv kernel.

    A stride-p, p x p convolution is this reshape followed by one matmul. On CPU the matmul is much
    faster than the convolution, above all in backward (ViT-B/32, batch 32, bf16: 14 ms vs 270 ms).
    """
    batch, channels, height, width = x.shape
    gh, gw = height // patch_size, width // patch_size
    x = x.reshape(batch, channels, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, gh * gw, channels * patch_size * patch_size)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, mlp_ratio: float = 4.0, quick_gelu: bool = True):
        super().__init__()
        self.input_resolution = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            x = self.conv1(x).flatten(2).transpose(1, 2)  # the conv drops the remainder; keep that behaviour
        else:
            x = F.linear(patchify(x, self.patch_size), self.conv1.weight.flatten(1))  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


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
