"""The two towers of a CLIP model as self-contained modules, the shape ONNX graphs need.

``ImageGraph`` takes pixels in [0, 1] (resized and cropped, not normalised) and applies the model's
mean/std inside, so a deployment needs no knowledge of the normalisation. ``TextGraph`` runs
``CLIP.encode_text`` without its one data-dependent step (``trim=False``: cutting the columns after
the last [EOS] gives a length that a traced graph would freeze): for a causal tower those columns
never reach the pooled token, so leaving them in gives the same features, and the length stays dynamic.
Both return the L2-normalised embeddings and the raw features.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.clip import CLIP

__all__ = ["ImageGraph", "TextGraph"]


class ImageGraph(nn.Module):
    """pixels [B, 3, S, S] in [0, 1] -> (image_embeds [B, D] L2-normalised, image_features [B, D])."""

    def __init__(self, model: CLIP, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.visual = model.visual
        # float32 as the torch transform's Normalize, so the subtraction and division round the same way
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.visual((pixels - self.mean) / self.std)
        return F.normalize(features, dim=-1), features


class TextGraph(nn.Module):
    """input_ids [B, L] int64, any L up to the context length -> (text_embeds [B, D], text_features [B, D])."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model
        self.config = model.config.text

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.encode_text(input_ids, trim=False)
        return F.normalize(features, dim=-1), features
