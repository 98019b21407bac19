"""The CLIP model: an image tower, a causal text transformer, and a learned temperature.

The text tower's parameters live on the CLIP module itself (``token_embedding``,
``transformer``, ``ln_final``, ``text_projection``), exactly where OpenAI's checkpoints
put them, so OpenAI and open_clip state dicts load with no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import ModelConfig
from clipforge.models.layers import LayerNorm, Transformer
from clipforge.models.modified_resnet import ModifiedResNet
from clipforge.models.vision_transformer import VisionTransformer

MAX_LOGIT_SCALE = 100.0  # the paper clips the learned temperature so logits never exceed 100x cosine


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        vision, text = config.vision, config.text
        if vision.is_resnet:
            self.visual = ModifiedResNet(vision.layers, config.embed_dim, vision.heads, vision.image_size, vision.width)
        else:
            self.visual = VisionTransformer(vision.image_size, vision.patch_size, vision.width, vision.layers,
                                            vision.heads, config.embed_dim, vision.mlp_ratio, config.quick_gelu)
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, config.quick_gelu)
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_text_like_openai()

    def _init_text_like_openai(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_like_openai_text()
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute each block's activations during backward."""
        self.transformer.grad_checkpointing = enable
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            visual.transformer.grad_checkpointing = enable
        else:
            visual.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image.to(self.visual_dtype))
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def visual_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if text.shape[-1] > self.context_length:
            raise ValueError(
                f"text has {text.shape[-1]} tokens but the model's context length is {self.context_length}; "
                f"tokenize with context_length={self.context_length}"
            )
        eot = text.argmax(dim=-1)  # [EOS] has the largest id, so argmax finds it
        # Causal attention: tokens after the last [EOS] cannot change any [EOS] feature,
        # so dropping them is exact and saves the padding's compute.
        text = text[:, : int(eot.max()) + 1] if text.shape[0] else text
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[: text.shape[1]].to(self.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        features = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def logit_scale_value(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_features: bool = False):
        """(logits_per_image, logits_per_text) as OpenAI's model, or, with return_features, the
        normalised features and the temperature multiplier: training computes the loss from
        these, and going through forward lets DistributedDataParallel see every parameter."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        scale = self.logit_scale_value()
        if return_features:
            return image_features, text_features, scale
        logits_per_image = scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()
