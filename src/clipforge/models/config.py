"""Architecture configuration as data: one JSON file per model, validated at the edge.

A config file looks like::

    {"embed_dim": 512, "quick_gelu": true,
     "vision": {"type": "vit", "image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12},
     "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12, "heads": 8}}

Optional fields cover open_clip's plain-CLIP family (layer scale, pooling types, no ln_pre,
bidirectional text, other tokenizers, ...); their names are open_clip's. Either tower may be
``null`` for a one-tower model (Hugging Face ``CLIPVisionModelWithProjection``, ...).
Every problem is reported as a ``ConfigError`` naming the field and the fix, before any
module is built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError

VISION_TYPES = ("vit", "resnet")
VISION_POOL_TYPES = ("tok", "avg")
TEXT_POOL_TYPES = ("argmax", "eos", "first", "last")
TEXT_ENCODERS = ("transformer", "cbow")
ATTENTIONAL_POOL = (False, True, "parallel", "cascade")
POS_EMBED_TYPES = ("learnable", "sin_cos_2d")
GELU_APPROXIMATE = ("none", "tanh")
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    type: str  # "vit" or "resnet"
    image_size: int
    width: int  # ViT: token width; ResNet: stem/base channel count
    layers: int | tuple[int, int, int, int]  # ViT: depth; ResNet: blocks per stage
    heads: int  # ViT: attention heads; ResNet: attention-pool heads
    patch_size: int | None = None  # ViT only
    mlp_ratio: float = 4.0
    # ViT options of open_clip's VisionTransformer (defaults are OpenAI's CLIP)
    ls_init_value: float | None = None  # layer scale (gamma) on both residual branches
    no_ln_pre: bool = False
    pool_type: str = "tok"  # class token, or the mean of the patch tokens
    final_ln_after_pool: bool = False  # ln_post on the pooled vector instead of every token
    attentional_pool: bool | str = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    pos_embed_type: str = "learnable"
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped while training
    norm_eps: float = 1e-5
    gelu_approximate: str = "none"

    @property
    def is_resnet(self) -> bool:
        return self.type == "resnet"

    @property
    def grid_size(self) -> int:
        return self.image_size // (32 if self.is_resnet else self.patch_size)

    @property
    def output_width(self) -> int:
        """Width of the features the tower pools: the ResNet's last stage is 32x its base width."""
        return self.width * 32 if self.is_resnet else self.width

    @property
    def is_standard(self) -> bool:
        """True when the fused inference path covers the tower (OpenAI's ViT, any LayerNorm eps; any ResNet)."""
        return self.is_resnet or (self.ls_init_value is None and not self.no_ln_pre and self.pool_type == "tok"
                                  and not self.final_ln_after_pool and self.attentional_pool is False
                                  and self.gelu_approximate == "none")


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    no_causal_mask: bool = False  # bidirectional attention (CLIPA)
    pool_type: str = "argmax"  # argmax: [EOS] has the largest id; eos: first eos_id; first/last: a position
    eos_id: int = 2  # only for pool_type "eos"
    pad_id: int = 0  # only with embed_cls: padding is masked out of attention
    embed_cls: bool = False  # a learned token appended after the text, pooled after ln_final (CoCa style)
    proj_type: str = "linear"  # "none": features are the pooled hidden state
    proj_bias: bool = False
    norm_eps: float = 1e-5
    gelu_approximate: str = "none"
    hf_tokenizer_name: str | None = None  # a Hugging Face tokenizer instead of CLIP's BPE
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)
    encoder: str = "transformer"  # or "cbow": the paper's bag-of-words encoder (token embeddings averaged, projected)

    @property
    def is_cbow(self) -> bool:
        return self.encoder == "cbow"

    @property
    def causal(self) -> bool:
        return not self.no_causal_mask

    @property
    def num_positions(self) -> int:
        return self.context_length + (1 if self.embed_cls else 0)

    @property
    def is_standard(self) -> bool:
        """True when the fused inference path covers the tower: causal, pooled at one token per text."""
        return (not self.is_cbow and self.ls_init_value is None and self.causal and self.pool_type in ("argmax", "eos")
                and not self.embed_cls and self.proj_type == "linear" and not self.proj_bias
                and self.gelu_approximate == "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into tensors for this checkpoint (open_clip's preprocess_cfg)."""

    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int
    vision: VisionConfig | None
    text: TextConfig | None
    quick_gelu: bool = True  # OpenAI's weights need QuickGELU; plain GELU silently loses accuracy
    custom_text: bool = False  # open_clip CustomTextCLIP layout: text weights under "text."
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # The paper's predictive baselines (Figure 2): "bow_prediction" adds a linear head from the image
    # embedding to the vocabulary, "caption_lm" turns the text transformer into a captioning decoder.
    predictive_head: str | None = None
    name: str = field(default="custom", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        if self.vision is not None:
            if self.vision.is_resnet:
                data["vision"]["layers"] = list(self.vision.layers)
                data["vision"].pop("patch_size")
            defaults = _defaults(VisionConfig)
            data["vision"] = {k: v for k, v in data["vision"].items()
                              if k in _VISION_REQUIRED or k == "patch_size" or v != defaults.get(k)}
        if self.text is not None:
            defaults = _defaults(TextConfig)
            data["text"] = {k: v for k, v in data["text"].items() if k in _TEXT_CORE or v != defaults.get(k)}
        for key in ("mean", "std"):
            data["preprocess"][key] = list(data["preprocess"][key])
        if self.preprocess == PreprocessConfig():
            data.pop("preprocess")
        if not self.custom_text:
            data.pop("custom_text")
        if self.predictive_head is None:
            data.pop("predictive_head")
        return data

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with top-level fields replaced; ``vision``/``text`` dicts are merged in."""
        name = changes.pop("name", self.name)
        data = self.to_dict()
        for tower in ("vision", "text"):
            if isinstance(changes.get(tower), dict) and data.get(tower) is not None:
                changes[tower] = {**data[tower], **changes[tower]}
        return config_from_dict({**data, **changes}, name=name)


_VISION_REQUIRED = ("type", "image_size", "width", "layers", "heads")
_TEXT_CORE = ("context_length", "vocab_size", "width", "layers", "heads")


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.default is not f.default_factory:  # dataclasses.MISSING compares unequal to values
            out[f.name] = f.default
    out.pop("tokenizer_kwargs", None)
    out["tokenizer_kwargs"] = {}
    return out


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"config field '{where}' {message}")


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        prefix = f"{where}." if where else ""
        raise _fail(prefix + unknown[0], f"is not a known field; allowed fields are: {', '.join(allowed)}")


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(where, f"must be a positive integer, got {value!r}")
    return value


def _non_negative_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"must be a non-negative integer, got {value!r}")
    return value


def _positive_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(where, f"must be a positive number, got {value!r}")
    return float(value)


def _optional_float(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"must be a number or null, got {value!r}")
    return float(value)


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"must be true or false, got {value!r}")
    return value


def _choice(value: Any, choices: tuple, where: str) -> Any:
    if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
        raise _fail(where, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _vit_options(data: dict) -> dict[str, Any]:
    patch_dropout = data.get("patch_dropout", 0.0)
    if isinstance(patch_dropout, bool) or not isinstance(patch_dropout, (int, float)) or not 0 <= patch_dropout < 1:
        raise _fail("vision.patch_dropout", f"must be a number in [0, 1), got {patch_dropout!r}")
    return {
        "ls_init_value": _optional_float(data.get("ls_init_value"), "vision.ls_init_value"),
        "no_ln_pre": _boolean(data.get("no_ln_pre", False), "vision.no_ln_pre"),
        "pool_type": _choice(data.get("pool_type", "tok"), VISION_POOL_TYPES, "vision.pool_type"),
        "final_ln_after_pool": _boolean(data.get("final_ln_after_pool", False), "vision.final_ln_after_pool"),
        "attentional_pool": _choice(data.get("attentional_pool", False), ATTENTIONAL_POOL, "vision.attentional_pool"),
        "attn_pooler_queries": _positive_int(data.get("attn_pooler_queries", 256), "vision.attn_pooler_queries"),
        "attn_pooler_heads": _positive_int(data.get("attn_pooler_heads", 8), "vision.attn_pooler_heads"),
        "pos_embed_type": _choice(data.get("pos_embed_type", "learnable"), POS_EMBED_TYPES, "vision.pos_embed_type"),
        "patch_dropout": float(patch_dropout),
        "norm_eps": _positive_float(data.get("norm_eps", 1e-5), "vision.norm_eps"),
        "gelu_approximate": _choice(data.get("gelu_approximate", "none"), GELU_APPROXIMATE, "vision.gelu_approximate"),
    }


def _vision_from_dict(data: Any) -> VisionConfig | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _fail("vision", "must be an object with type, image_size, width, layers and heads (or null)")
    _check_keys(data, tuple(f.name for f in fields(VisionConfig)), "vision")
    kind = data.get("type")
    if kind not in VISION_TYPES:
        raise _fail("vision.type", f"must be one of {VISION_TYPES}, got {kind!r}")
    for key in ("image_size", "width", "layers", "heads"):
        if key not in data:
            raise _fail(f"vision.{key}", "is required")
    image_size = _positive_int(data["image_size"], "vision.image_size")
    width = _positive_int(data["width"], "vision.width")
    heads = _positive_int(data["heads"], "vision.heads")
    mlp_ratio = _positive_float(data.get("mlp_ratio", 4.0), "vision.mlp_ratio")
    if kind == "resnet":
        layers = data["layers"]
        if not isinstance(layers, (list, tuple)) or len(layers) != 4:
            raise _fail("vision.layers", f"must list the blocks of the 4 ResNet stages, e.g. [3, 4, 6, 3], got {layers!r}")
        layers = tuple(_positive_int(n, f"vision.layers[{i}]") for i, n in enumerate(layers))
        if data.get("patch_size") is not None:
            raise _fail("vision.patch_size", "applies only to type 'vit'; remove it for a ResNet")
        vit_only = sorted(k for k in data if k in _vit_options({}) and data[k] != _vit_options({})[k])
        if vit_only:
            raise _fail(f"vision.{vit_only[0]}", "applies only to type 'vit'; remove it for a ResNet")
        if image_size % 32:
            raise _fail("vision.image_size", f"must be a multiple of 32 for a ResNet (it downsamples 32x), got {image_size}")
        if (width * 32) % heads:
            raise _fail("vision.heads", f"must divide the pooled width 32*width = {width * 32}")
        return VisionConfig("resnet", image_size, width, layers, heads, None, mlp_ratio)
    layers = _positive_int(data["layers"], "vision.layers")
    patch = _positive_int(data.get("patch_size"), "vision.patch_size")
    if image_size % patch:
        raise _fail("vision.image_size", f"must be a multiple of patch_size {patch}, got {image_size}")
    if width % heads:
        raise _fail("vision.heads", f"must divide vision.width {width}, got {heads}")
    return VisionConfig("vit", image_size, width, layers, heads, patch, mlp_ratio, **_vit_options(data))


def _text_from_dict(data: Any) -> TextConfig | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _fail("text", "must be an object with context_length, vocab_size, width, layers and heads (or null)")
    _check_keys(data, tuple(f.name for f in fields(TextConfig)), "text")
    values = {**_defaults(TextConfig), **data}
    tokenizer_name = values["hf_tokenizer_name"]
    if tokenizer_name is not None and (not isinstance(tokenizer_name, str) or not tokenizer_name):
        raise _fail("text.hf_tokenizer_name", f"must be a Hugging Face tokenizer id or folder, got {tokenizer_name!r}")
    if not isinstance(values["tokenizer_kwargs"], dict):
        raise _fail("text.tokenizer_kwargs", f"must be an object, got {values['tokenizer_kwargs']!r}")
    config = TextConfig(
        context_length=_positive_int(values["context_length"], "text.context_length"),
        vocab_size=_positive_int(values["vocab_size"], "text.vocab_size"),
        width=_positive_int(values["width"], "text.width"),
        layers=_positive_int(values["layers"], "text.layers"),
        heads=_positive_int(values["heads"], "text.heads"),
        mlp_ratio=_positive_float(values["mlp_ratio"], "text.mlp_ratio"),
        ls_init_value=_optional_float(values["ls_init_value"], "text.ls_init_value"),
        no_causal_mask=_boolean(values["no_causal_mask"], "text.no_causal_mask"),
        pool_type=_choice(values["pool_type"], TEXT_POOL_TYPES, "text.pool_type"),
        eos_id=_non_negative_int(values["eos_id"], "text.eos_id"),
        pad_id=_non_negative_int(values["pad_id"], "text.pad_id"),
        embed_cls=_boolean(values["embed_cls"], "text.embed_cls"),
        proj_type=_choice(values["proj_type"], ("linear", "none"), "text.proj_type"),
        proj_bias=_boolean(values["proj_bias"], "text.proj_bias"),
        norm_eps=_positive_float(values["norm_eps"], "text.norm_eps"),
        gelu_approximate=_choice(values["gelu_approximate"], GELU_APPROXIMATE, "text.gelu_approximate"),
        hf_tokenizer_name=tokenizer_name,
        tokenizer_kwargs=dict(values["tokenizer_kwargs"]),
        encoder=_choice(values["encoder"], TEXT_ENCODERS, "text.encoder"),
    )
    if config.width % config.heads:
        raise _fail("text.heads", f"must divide text.width {config.width}, got {config.heads}")
    if config.is_cbow and (config.pool_type not in ("argmax", "eos") or config.embed_cls or config.proj_type != "linear"
                           or config.proj_bias):
        raise _fail("text.encoder", "'cbow' averages the tokens up to [EOS] and projects them linearly: use it with "
                                    "pool_type argmax or eos, no embed_cls, proj_type linear without proj_bias")
    if config.context_length < 2:
        raise _fail("text.context_length", "must be at least 2 (room for [SOS] and [EOS])")
    return config


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _fail(where, f"must be 3 numbers (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


def preprocess_from_dict(data: Any) -> PreprocessConfig:
    if data is None:
        return PreprocessConfig()
    if not isinstance(data, dict):
        raise _fail("preprocess", f"must be an object with mean, std, interpolation, resize_mode, fill_color, got {data!r}")
    _check_keys(data, tuple(f.name for f in fields(PreprocessConfig)), "preprocess")
    std = _triple(data.get("std", OPENAI_STD), "preprocess.std")
    if any(s == 0 for s in std):
        raise _fail("preprocess.std", f"must not contain zeros, got {std}")
    fill = data.get("fill_color", 0)
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise _fail("preprocess.fill_color", f"must be an integer 0-255, got {fill!r}")
    return PreprocessConfig(
        mean=_triple(data.get("mean", OPENAI_MEAN), "preprocess.mean"), std=std,
        interpolation=_choice(data.get("interpolation", "bicubic"), INTERPOLATIONS, "preprocess.interpolation"),
        resize_mode=_choice(data.get("resize_mode", "shortest"), RESIZE_MODES, "preprocess.resize_mode"),
        fill_color=fill,
    )


def config_from_dict(data: Any, name: str = "custom") -> ModelConfig:
    """Validate a plain dict (parsed JSON) into a ModelConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
    _check_keys(data, ("embed_dim", "vision", "text", "quick_gelu", "custom_text", "preprocess", "predictive_head"), "")
    if "embed_dim" not in data:
        raise _fail("embed_dim", "is required (the size of the joint image-text space, e.g. 512)")
    if "vision" not in data:
        raise _fail("vision", "is required (an object, or null for a text-only model)")
    vision, text = _vision_from_dict(data["vision"]), _text_from_dict(data.get("text", {}))
    if vision is None and text is None:
        raise _fail("vision", "and 'text' cannot both be null; a CLIP model needs at least one tower")
    return ModelConfig(
        embed_dim=_positive_int(data["embed_dim"], "embed_dim"),
        vision=vision,
        text=text,
        quick_gelu=_boolean(data.get("quick_gelu", True), "quick_gelu"),
        custom_text=_boolean(data.get("custom_text", False), "custom_text"),
        preprocess=preprocess_from_dict(data.get("preprocess")),
        predictive_head=_predictive_head(data.get("predictive_head"), vision, text),
        name=name,
    )


PREDICTIVE_HEADS = ("bow_prediction", "caption_lm")


def _predictive_head(value: Any, vision: VisionConfig | None, text: TextConfig | None) -> str | None:
    if value is None:
        return None
    head = _choice(value, PREDICTIVE_HEADS, "predictive_head")
    if vision is None or text is None:
        raise _fail("predictive_head", "needs both towers: the image predicts the caption's tokens")
    if head == "caption_lm" and (text.is_cbow or not text.is_standard):
        raise _fail("predictive_head", "'caption_lm' decodes with a plain causal text transformer "
                                       "(text.encoder 'transformer', pool_type argmax, no embed_cls)")
    return head


def read_config_json(path: str | Path) -> Any:
    """A config file's parsed JSON, or a ConfigError naming the file and the fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model config file '{path}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model config file '{path}' is not valid JSON ({error}); fix the file") from None


def config_from_file(path: str | Path) -> ModelConfig:
    path = Path(path)
    data = read_config_json(path)
    try:
        return config_from_dict(data, name=path.stem)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
