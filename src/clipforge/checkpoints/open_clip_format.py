"""open_clip's hub layout: ``open_clip_config.json`` plus weights in OpenAI's key layout.

Only open_clip configs that describe the CLIP of the paper are accepted; options that
change the computation (layer scale, other pooling, timm or HF towers, ...) are refused by
name rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from clipforge.errors import CheckpointError
from clipforge.models.config import ModelConfig, config_from_dict
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

CONFIG_NAME = "open_clip_config.json"
SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHTS_NAME = "open_clip_pytorch_model.bin"

# open_clip options and the value under which they leave OpenAI's computation unchanged.
# (Patch dropout is absent on purpose: it acts only in training.)
_NEUTRAL_VISION = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                   "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                   "act_kwargs": None, "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False,
                   "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                   "timm_model_name": None}
_NEUTRAL_TEXT = {"hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                 "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
                 "act_kwargs": None, "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False,
                 "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {}


def _check_neutral(cfg: dict[str, Any], neutral: dict[str, Any], tower: str) -> None:
    for key, neutral_value in neutral.items():
        value = cfg.get(key, neutral_value)
        if value != neutral_value and not (_is_off(value) and _is_off(neutral_value)):
            raise CheckpointError(f"open_clip config sets {tower}.{key}={value!r}, which changes the model beyond "
                                  "the CLIP of the paper; clipforge does not support it")


def from_open_clip_config(data: dict[str, Any], name: str) -> tuple[ModelConfig, dict[str, Any]]:
    """ModelConfig and preprocessing settings (mean, std) from an open_clip_config.json."""
    model_cfg = data.get("model_cfg", data)
    vision = dict(model_cfg.get("vision_cfg") or {})
    text = dict(model_cfg.get("text_cfg") or {})
    if "custom_text" in model_cfg and model_cfg["custom_text"]:
        raise CheckpointError("open_clip config uses a custom text tower (custom_text); clipforge does not support it")
    _check_neutral(vision, _NEUTRAL_VISION, "vision_cfg")
    _check_neutral(text, _NEUTRAL_TEXT, "text_cfg")
    head_width = vision.get("head_width", 64)
    width = vision.get("width", 768)
    layers = vision.get("layers", 12)
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise CheckpointError(f"open_clip config has a non-square image_size {image_size}; clipforge needs square")
        image_size = image_size[0]
    if isinstance(layers, (list, tuple)):
        vision_cfg = {"type": "resnet", "image_size": image_size, "layers": list(layers), "width": width,
                      "heads": width * 32 // head_width}
    else:
        vision_cfg = {"type": "vit", "image_size": image_size, "patch_size": vision.get("patch_size", 16),
                      "width": width, "layers": layers, "heads": width // head_width,
                      "mlp_ratio": vision.get("mlp_ratio", 4.0)}
    text_cfg = {"context_length": text.get("context_length", 77), "vocab_size": text.get("vocab_size", 49408),
                "width": text.get("width", 512), "layers": text.get("layers", 12), "heads": text.get("heads", 8),
                "mlp_ratio": text.get("mlp_ratio", 4.0)}
    config = config_from_dict({"embed_dim": model_cfg.get("embed_dim", 512),
                               "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                               "vision": vision_cfg, "text": text_cfg}, name)
    preprocess = data.get("preprocess_cfg") or {}
    return config, {"mean": tuple(preprocess.get("mean", OPENAI_MEAN)), "std": tuple(preprocess.get("std", OPENAI_STD))}


def to_open_clip_config(config: ModelConfig) -> dict[str, Any]:
    vision, text = config.vision, config.text
    if vision.is_resnet:
        vision_cfg = {"image_size": vision.image_size, "layers": list(vision.layers), "width": vision.width,
                      "head_width": vision.width * 32 // vision.heads}
    else:
        vision_cfg = {"image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
                      "patch_size": vision.patch_size, "head_width": vision.width // vision.heads,
                      "mlp_ratio": vision.mlp_ratio}
    model_cfg = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision_cfg,
                 "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size,
                              "width": text.width, "heads": text.heads, "layers": text.layers,
                              "mlp_ratio": text.mlp_ratio}}
    preprocess_cfg = {"size": vision.image_size, "mode": "RGB", "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
