"""Run a checkpoint at another resolution or context length: resize its position tables on load.

The interpolation is open_clip's (``resize_pos_embed``: bicubic with antialiasing over the patch
grid, the class token kept; ``resize_text_pos_embed``: linear over positions), so a model loaded
with ``image_size=N`` computes what open_clip's ``force_image_size=N`` model computes. ModifiedResNet
attention-pool positions (which open_clip leaves alone, so its load fails) are resized the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipforge.errors import CheckpointError
from clipforge.models.config import ModelConfig


def _resize_grid(table: torch.Tensor, grid: int, key: str) -> torch.Tensor:
    """[1 + g0*g0, W] -> [1 + grid*grid, W], the first (class / mean) row kept."""
    old_grid = int(math.sqrt(table.shape[0] - 1))
    if old_grid * old_grid + 1 != table.shape[0]:
        raise CheckpointError(f"'{key}' has {table.shape[0]} rows, not a square grid plus one; it cannot be resized")
    token, image = table[:1], table[1:]
    image = image.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    image = image.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
    return torch.cat([token, image], dim=0)


def _resize_positions(table: torch.Tensor, positions: int) -> torch.Tensor:
    resized = F.interpolate(table.float().t().unsqueeze(0), size=positions, mode="linear", antialias=False,
                            align_corners=False)
    return resized[0].t().to(table.dtype)


def resize_position_tables(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose position tables fit ``config``'s image size and context length."""
    state = dict(state)
    vision, text = config.vision, config.text
    if vision is not None:
        key = "visual.attnpool.positional_embedding" if vision.is_resnet else "visual.positional_embedding"
        rows = vision.grid_size ** 2 + 1
        if key in state and state[key].shape[0] != rows:
            state[key] = _resize_grid(state[key], vision.grid_size, key)
    if text is not None and "positional_embedding" in state and state["positional_embedding"].shape[0] != text.num_positions:
        state["positional_embedding"] = _resize_positions(state["positional_embedding"], text.num_positions)
    return state
