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

from clipforge.errors import InputError
from clipforge.models.config import ModelConfig, TextConfig
from clipforge.models.inference_layers import InferenceTransformer, float_copy, layer_norm
from clipforge.models.layers import LayerNorm, Transformer
from clipforge.models.modified_resnet import InferenceResNet, ModifiedResNet
from clipforge.models.vision_transformer import (
    InferenceVisionTransformer,
    VisionTransformer,
)

MAX_LOGIT_SCALE = 100.0  # the paper clips the learned temperature so logits never exceed 100x cosine


def check_text_length(text: torch.Tensor, context_length: int) -> None:
    if text.shape[-1] > context_length:
        raise InputError(
            f"text has {text.shape[-1]} tokens but the model's context length is {context_length}; "
            f"tokenize with model.tokenize(...) or clipforge.tokenize(..., context_length={context_length})"
        )


def pooled_positions(text: torch.Tensor, config: TextConfig) -> torch.Tensor | None:
    """Where each sequence's feature is read: its [EOS] (the largest id, or the first ``eos_id``);
    None for 'first'/'last', which depend on the padded length."""
    if config.pool_type == "argmax":
        return text.argmax(dim=-1)
    if config.pool_type == "eos":
        return (text == config.eos_id).int().argmax(dim=-1)
    return None


def check_image_size(image: torch.Tensor, config: ModelConfig) -> None:
    size = config.vision.image_size
    if image.dim() != 4 or tuple(image.shape[-2:]) != (size, size) or image.shape[1] != 3:
        raise InputError(
            f"model '{config.name}' takes images of shape [N, 3, {size}, {size}], got {list(image.shape)}; "
            f"preprocess with the model's transform, or load it with image_size={image.shape[-1]} "
            "to resize its position embeddings"
        )


def trim_to_pooled(text: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal towers only: drop the columns after the last pooled position (they cannot reach it)."""
    return (text[:, : int(pooled.max()) + 1] if text.shape[0] else text), pooled


def _text_attention_mask(text: torch.Tensor, config: TextConfig, heads: int) -> torch.Tensor:
    """open_clip's additive mask for a text tower with an appended class token: causal (unless disabled)
    plus padding masked out of the keys. The key-validity row is open_clip's legacy one: the class
    token's (always valid) flag comes first, so every flag is shifted one position to the right."""
    length = text.shape[1] + 1
    valid = torch.cat([torch.ones_like(text[:, :1], dtype=torch.bool), text != config.pad_id], dim=1)
    mask = torch.zeros(text.shape[0], 1, length, length, device=text.device)
    mask.masked_fill_(~valid[:, None, None, :], float("-inf"))
    if config.causal:
        mask = mask + torch.full((length, length), float("-inf"), device=text.device).triu_(1)
    return mask


class CLIP(nn.Module):
    """Image tower, text tower, learned temperature. Either tower may be absent (one-tower checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = self._build_visual(config) if config.vision is not None else None
        text = config.text
        if text is not None:
            self.context_length = text.context_length
            self.vocab_size = text.vocab_size
            self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        if text is not None and text.is_cbow:  # the paper's CBOW: mean token embedding, projected
            self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.text_projection, std=text.width ** -0.5)
        elif text is not None:
            self.positional_embedding = nn.Parameter(torch.empty(text.num_positions, text.width))
            if text.embed_cls:
                self.cls_emb = nn.Parameter(torch.empty(text.width))
            self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, config.quick_gelu,
                                           text.ls_init_value, text.norm_eps, text.gelu_approximate)
            self.ln_final = LayerNorm(text.width, eps=text.norm_eps)
            if text.proj_type == "none":
                self.text_projection = None
            elif text.proj_bias:
                self.text_projection = nn.Linear(text.width, config.embed_dim)
            else:
                self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
            self._init_text_like_openai()
        if config.predictive_head == "bow_prediction":  # image embedding -> a distribution over the vocabulary
            self.bow_head = nn.Linear(config.embed_dim, text.vocab_size)
        elif config.predictive_head == "caption_lm":  # the image embedding takes [SOT]'s place in the decoder
            self.caption_prefix = nn.Linear(config.embed_dim, text.width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @staticmethod
    def _build_visual(config: ModelConfig) -> nn.Module:
        vision = config.vision
        if vision.is_resnet:
            return ModifiedResNet(vision.layers, config.embed_dim, vision.heads, vision.image_size, vision.width)
        return VisionTransformer(vision.image_size, vision.patch_size, vision.width, vision.layers, vision.heads,
                                 config.embed_dim, vision.mlp_ratio, config.quick_gelu, vision)

    def _init_text_like_openai(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.config.text.embed_cls:
            nn.init.normal_(self.cls_emb, std=0.01)
        self.transformer.init_like_openai_text()
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=self.transformer.width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def image_size(self) -> int:
        return self._vision().image_size

    @property
    def has_image_tower(self) -> bool:
        return self.config.vision is not None

    @property
    def has_text_tower(self) -> bool:
        return self.config.text is not None

    def _vision(self):
        if self.config.vision is None:
            raise InputError(f"model '{self.config.name}' has no image tower (it was loaded from a text-only "
                             "checkpoint); encode images with a model that has one")
        return self.config.vision

    def _text(self) -> TextConfig:
        if self.config.text is None:
            raise InputError(f"model '{self.config.name}' has no text tower (it was loaded from an image-only "
                             "checkpoint); encode text with a model that has one")
        return self.config.text

    def tokenize(self, texts, context_length: int | None = None) -> torch.Tensor:
        """Token ids for this model: its tokenizer and context length, long texts truncated (as open_clip)."""
        from clipforge.tokenizer.factory import get_tokenizer

        return get_tokenizer(self)(texts, context_length=context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute each block's activations during backward."""
        if self.has_text_tower and not self.config.text.is_cbow:
            self.transformer.grad_checkpointing = enable
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            visual.transformer.grad_checkpointing = enable
        elif visual is not None:
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
        copy; build a new one after training. Towers with open_clip options the fused kernels do not
        cover (layer scale, other pooling, bidirectional text, ...) run as they are, in ``dtype``.
        """
        return InferenceCLIP(self, dtype, channels_last=channels_last, compile=compile)

    def check_image_size(self, image: torch.Tensor) -> None:
        self._vision()
        check_image_size(image, self.config)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.check_image_size(image)
        features = self.visual(image.to(self.visual_dtype))
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def visual_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_text(self, text: torch.Tensor, normalize: bool = False, trim: bool = True) -> torch.Tensor:
        """Text features. A causal tower first drops the columns after the batch's last [EOS] (they never
        reach a pooled token); ``trim=False`` keeps them, e.g. for a traced graph whose length must stay dynamic."""
        config = self._text()
        check_text_length(text, self.context_length)
        if config.is_cbow:
            return self._encode_bag_of_words(text, normalize)
        positions = pooled_positions(text, config)
        if trim and config.causal and positions is not None and not config.embed_cls:
            text, positions = trim_to_pooled(text, positions)
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(text).to(dtype)
        mask = None
        if config.embed_cls:
            x = torch.cat([x, self.cls_emb.to(dtype).expand(x.shape[0], 1, -1)], dim=1)
            mask = _text_attention_mask(text, config, 1)
        x = x + self.positional_embedding[: x.shape[1]].to(dtype)
        x = self.transformer(x, causal=config.causal and mask is None, attn_mask=mask)
        if config.embed_cls:
            pooled = x[:, -1]
        elif positions is not None:
            pooled = x[torch.arange(x.shape[0], device=x.device), positions]
        else:
            pooled = x[:, 0] if config.pool_type == "first" else x[:, -1]
        features = self.ln_final(pooled)  # LayerNorm is per token: norming only the pooled one is exact
        if isinstance(self.text_projection, nn.Linear):
            features = self.text_projection(features)
        elif self.text_projection is not None:
            features = features @ self.text_projection
        if dtype != self.dtype:  # a bf16 text tower in a float32 model (text_weights_dtype): the loss stays float32
            features = features.to(self.dtype)
        return F.normalize(features, dim=-1) if normalize else features

    def _encode_bag_of_words(self, text: torch.Tensor, normalize: bool) -> torch.Tensor:
        """CBOW: the mean embedding of each caption's tokens, [SOT] to [EOS] (padding left out), projected."""
        length = pooled_positions(text, self.config.text) + 1  # tokens up to and including [EOS]
        keep = torch.arange(text.shape[1], device=text.device) < length[:, None]
        embedded = self.token_embedding(text) * keep.unsqueeze(-1).to(self.token_embedding.weight.dtype)
        features = embedded.sum(dim=1) / length.unsqueeze(-1).to(embedded.dtype)
        features = (features @ self.text_projection).to(self.dtype)
        return F.normalize(features, dim=-1) if normalize else features

    def logit_scale_value(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def predict_words(self, image: torch.Tensor) -> torch.Tensor:
        """bow_prediction: [N, vocab] logits of each image's caption words (softmax = the predicted bag)."""
        return self.bow_logits(self.encode_image(image, normalize=True))

    def bow_logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The bag-of-words head on L2-normalised embeddings (what zero-shot caches) times sqrt(embed_dim):
        unit variance per dimension, else its logits barely differ between images at initialisation."""
        scale = self.config.embed_dim ** 0.5
        return self.bow_head(image_embeddings.to(self.bow_head.weight.dtype) * scale)

    def caption_logits(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """caption_lm: [N, L, vocab] next-token logits (position t predicts ``text[:, t + 1]``). The causal
        text transformer decodes; the projected L2-normalised image embedding replaces [SOT] (a prefix every
        token attends to), and the output layer is the token embedding, tied as in GPT-2."""
        dtype = self.token_embedding.weight.dtype
        tokens = self.token_embedding(text[:, 1:]).to(dtype)
        prefix = self.caption_prefix(image_features.to(self.caption_prefix.weight.dtype)).to(dtype)
        x = torch.cat([prefix.unsqueeze(1), tokens], dim=1) + self.positional_embedding[: text.shape[1]].to(dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        return x @ self.token_embedding.weight.t()

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_features: bool = False,
                predict: bool = False):
        """(logits_per_image, logits_per_text) as OpenAI's model, or, with return_features, the
        normalised features and the temperature multiplier: training computes the loss from
        these, and going through forward lets DistributedDataParallel see every parameter.
        ``predict``: the predictive head's logits (``predict_words``, or ``caption_logits`` for
        captions cut after the batch's last [EOS])."""
        if predict:
            if self.config.predictive_head == "bow_prediction":
                return self.predict_words(image)
            text = trim_to_pooled(text, text.argmax(dim=-1))[0]
            return self.caption_logits(self.encode_image(image, normalize=True), text)
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        scale = self.logit_scale_value()
        if return_features:
            return image_features, text_features, scale
        logits_per_image = scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


class _PlainTower(nn.Module):
    """A tower the fused kernels do not cover, frozen as it is in ``dtype`` (features in float32)."""

    def __init__(self, encode, module: CLIP, dtype: torch.dtype):
        super().__init__()
        self.model = copy.deepcopy(module).to(dtype).eval().requires_grad_(False)
        self.encode = encode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.model, x).float()


class InferenceCLIP(nn.Module):
    """A CLIP frozen for inference (built by ``CLIP.for_inference``): ``encode_image``, ``encode_text``
    and ``forward`` as CLIP's, run under ``torch.inference_mode``, returning float32.

    It holds its own copies of the weights on the model's device; it cannot be trained, moved or saved.
    """

    def __init__(self, model: CLIP, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 compile: bool = False):
        super().__init__()
        self.config, self.dtype = model.config, dtype
        vision, text = model.config.vision, model.config.text
        self.channels_last = channels_last and isinstance(model.visual, ModifiedResNet)
        self._compiled = None
        self.fused_text = text is not None and text.is_standard
        with torch.no_grad():
            if vision is not None and compile:
                tower = copy.deepcopy(model.visual).to(dtype).eval().requires_grad_(False)
                if self.channels_last:
                    tower = tower.to(memory_format=torch.channels_last)
                self._compiled = torch.compile(tower)
            if vision is None:
                self.visual = None
            elif isinstance(model.visual, ModifiedResNet):
                self.visual = InferenceResNet(model.visual, dtype, channels_last)
            elif vision.is_standard:
                self.visual = InferenceVisionTransformer(model.visual, dtype)
            else:
                self.visual = _PlainTower(lambda m, x: m(x), model.visual, dtype)
            if text is not None:
                self.context_length = model.context_length
            if self.fused_text:
                self.token_embedding = model.token_embedding.weight.detach().to(dtype)
                self.positional_embedding = model.positional_embedding.detach().to(dtype)
                self.transformer = InferenceTransformer(model.transformer, dtype)
                self.ln_final = float_copy(model.ln_final)
                self.text_projection = model.text_projection.detach().float()
            elif text is not None:
                self.text_tower = _PlainTower(lambda m, ids: m.encode_text(ids), model, dtype)
            self.logit_scale = model.logit_scale_value().detach().float()
        self.eval()

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.visual is None:
            raise InputError(f"model '{self.config.name}' has no image tower; encode images with a model that has one")
        check_image_size(image, self.config)
        image = image.to(self.logit_scale.device)
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
        if self.config.text is None:
            raise InputError(f"model '{self.config.name}' has no text tower; encode text with a model that has one")
        text = text.to(self.logit_scale.device)
        if not self.fused_text:
            features = self.text_tower(text)
            return F.normalize(features, dim=-1) if normalize else features
        check_text_length(text, self.context_length)
        text, eot = trim_to_pooled(text, pooled_positions(text, self.config.text))
        if not text.shape[0]:
            return self.text_projection.new_zeros(0, self.text_projection.shape[1])
        x = F.embedding(text, self.token_embedding) + self.positional_embedding[: text.shape[1]]
        x = self.transformer(x, pool=eot, causal=True, ids=text)  # [B, D]: only each [EOS] row
        features = layer_norm(x.float(), self.ln_final) @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    @torch.inference_mode()
    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_per_image = self.logit_scale * self.encode_image(image, True) @ self.encode_text(text, True).t()
        return logits_per_image, logits_per_image.t()
