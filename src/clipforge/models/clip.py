"""The CLIP model: an image tower, a causal text transformer, and a learned temperature.

The text tower's parameters live on the CLIP module itself (``token_embedding``,
``transformer``, ``ln_final``, ``text_projection``), exactly where OpenAI's checkpoints
put them, so OpenAI and open_clip state dicts load with no renaming.

``CLIP.for_inference`` returns an ``InferenceCLIP``: the same function, frozen, with weights in
bfloat16 (or float32) and fused kernels; see docs/benchmarks.md for what each part buys.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import ModelConfig
from clipforge.models.layers import (
    InferenceTransformer,
    LayerNorm,
    Transformer,
    float_copy,
    layer_norm,
)
from clipforge.models.modified_resnet import InferenceResNet, ModifiedResNet
from clipforge.models.vision_transformer import (
    InferenceVisionTransformer,
    VisionTransformer,
)

MAX_LOGIT_SCALE = 100.0  # the paper clips the learned temperature so logits never exceed 100x cosine


def trim_text(text: torch.Tensor, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids cut after the batch's last [EOS], each row's [EOS] position); checks the length.

    Causal attention: tokens after the last [EOS] cannot change any [EOS] feature, so dropping
    them is exact and saves the padding's compute.
    """
    if text.shape[-1] > context_length:
        raise ValueError(
            f"text has {text.shape[-1]} tokens but the model's context length is {context_length}; "
            f"tokenize with context_length={context_length}"
        )
    eot = text.argmax(dim=-1)  # [EOS] has the largest id, so argmax finds it
    return (text[:, : int(eot.max()) + 1] if text.shape[0] else text), eot


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

    def for_inference(self, dtype: torch.dtype = torch.float32, *, channels_last: bool = True,
                      compile: bool = False) -> InferenceCLIP:
        """A frozen copy for fast inference: ``dtype`` weights (bfloat16 is the fast one on CPUs with
        AVX-512-BF16/AMX and on GPUs), LayerNorms and the final projections in float32, BatchNorm folded
        into the ResNet convs, ``channels_last`` ResNet activations. Features come back in float32.

        ``compile``: run the image tower through ``torch.compile`` (inductor, weights frozen into the
        graph) instead of the fused eager kernels; it pays for ResNets on CPU (docs/benchmarks.md).
        The first call per input shape compiles (seconds); if compiling fails, a warning is given
        and the eager fast path is used. Later changes to this model's weights do not reach the
        copy; build a new one after training.
        """
        return InferenceCLIP(self, dtype, channels_last=channels_last, compile=compile)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image.to(self.visual_dtype))
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def visual_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        text, eot = trim_text(text, self.context_length)
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


class InferenceCLIP(nn.Module):
    """A CLIP frozen for inference (built by ``CLIP.for_inference``): ``encode_image``, ``encode_text``
    and ``forward`` as CLIP's, run under ``torch.inference_mode``, returning float32.

    It holds its own copies of the weights on the model's device; it cannot be trained, moved or saved.
    """

    def __init__(self, model: CLIP, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 compile: bool = False):
        super().__init__()
        self.config, self.context_length, self.dtype = model.config, model.context_length, dtype
        self.channels_last = channels_last and isinstance(model.visual, ModifiedResNet)
        self._compiled = None
        with torch.no_grad():
            if compile:
                tower = copy.deepcopy(model.visual).to(dtype).eval().requires_grad_(False)
                if self.channels_last:
                    tower = tower.to(memory_format=torch.channels_last)
                self._compiled = torch.compile(tower)
            if isinstance(model.visual, ModifiedResNet):
                self.visual = InferenceResNet(model.visual, dtype, channels_last)
            else:
                self.visual = InferenceVisionTransformer(model.visual, dtype)
            self.token_embedding = model.token_embedding.weight.detach().to(dtype)
            self.positional_embedding = model.positional_embedding.detach().to(dtype)
            self.transformer = InferenceTransformer(model.transformer, dtype)
            self.ln_final = float_copy(model.ln_final)
            self.text_projection = model.text_projection.detach().float()
            self.logit_scale = model.logit_scale_value().detach().float()
        self.eval()

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        image = image.to(self.text_projection.device)
        features = self._compiled_image(image) if self._compiled is not None else None
        if features is None:
            features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def _compiled_image(self, image: torch.Tensor) -> torch.Tensor | None:
        """The compiled tower's features, or None (for good) after a compilation failure."""
        x = image.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):  # constant weights: packed and folded once
                return self._compiled(x).float()
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the eager path
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                          "using the eager fast path")
            self._compiled = None
            return None

    @torch.inference_mode()
    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        text, eot = trim_text(text.to(self.token_embedding.device), self.context_length)
        if not text.shape[0]:
            return self.text_projection.new_zeros(0, self.text_projection.shape[1])
        x = F.embedding(text, self.token_embedding) + self.positional_embedding[: text.shape[1]]
        x = self.transformer(x, pool=eot, causal=True)  # [B, D]: only each [EOS] row
        features = layer_norm(x.float(), self.ln_final) @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    @torch.inference_mode()
    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_per_image = self.logit_scale * self.encode_image(image, True) @ self.encode_text(text, True).t()
        return logits_per_image, logits_per_image.t()
