"""open_clip's model configs -> clipforge's, field by field (the option names are open_clip's).

open_clip's plain-CLIP family (ViT or ModifiedResNet image tower, transformer text tower) maps
onto clipforge's config. Options that make another model (timm or Hugging Face towers, CoCa,
SigLIP's logit bias, open_clip's "custom" attention block) are refused by name rather than
silently ignored.
"""

from __future__ import annotations

import math
from typing import Any

from clipforge.errors import ConfigError, shorten
from clipforge.models.config import ModelConfig, config_from_dict
from clipforge.transforms.image import preprocess_kwargs

# Options that change the computation in ways clipforge does not implement, with their neutral value.
_UNSUPPORTED_VISION = {"timm_model_name": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                       "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}
_UNSUPPORTED_TEXT = {"hf_model_name": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                     "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                     "tokenizer_mode": None}
_UNSUPPORTED_MODEL = {"multimodal_cfg": None, "init_logit_bias": None}
# Options that do not change what the model computes at inference (or that open_clip itself ignores).
_IGNORED_VISION = ("output_tokens", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                   "timm_drop", "timm_drop_path")
_IGNORED_TEXT = ("output_tokens", "final_ln_after_pool", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type")
_VIT_OPTIONS = ("ls_init_value", "no_ln_pre", "pool_type", "final_ln_after_pool", "attentional_pool",
                "attn_pooler_queries", "attn_pooler_heads", "pos_embed_type", "patch_dropout")
_TEXT_OPTIONS = ("ls_init_value", "no_causal_mask", "pool_type", "eos_id", "pad_id", "embed_cls", "proj_type",
                 "proj_bias", "hf_tokenizer_name", "tokenizer_kwargs")


def _short(value: Any, limit: int = 40) -> str:
    """repr(value) on one line and at most limit characters: a message never echoes a huge value."""
    return shorten(repr(value), limit)


def _refuse(where: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"open_clip config sets {where}={_short(value)}, {why}; clipforge loads open_clip's plain "
                           "CLIP family (ViT or ModifiedResNet image tower, transformer text tower) only")


def _wrong(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"open_clip config field {where} must be {expected}, got {_short(value)}; fix the config")


def _section(value: Any, where: str) -> dict[str, Any]:
    """An object-valued option (null or absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong(where, value, "an object")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _wrong(where, value, "a positive integer")
    return value


def _ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _wrong(where, value, "a positive number")
    return value


def _flag(value: Any, where: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise _wrong(where, value, "true or false")
    return bool(value)


def _check_unsupported(cfg: dict[str, Any], unsupported: dict[str, Any], where: str) -> None:
    for key, neutral in unsupported.items():
        value = cfg.get(key, neutral)
        if value not in (neutral, None, False, "default", ""):
            raise _refuse(f"{where}{key}", value, "which builds a model outside clipforge's architectures")


def _square(value: Any, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if not value or len(set(_count(v, where) for v in value)) != 1:
            raise _refuse(where, value, "a non-square size")
        value = value[0]
    return _count(value, where)


def _norm_and_act(cfg: dict[str, Any], where: str, quick_gelu: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    norm = _section(cfg.get("norm_kwargs"), f"{where}norm_kwargs")
    if set(norm) - {"eps"}:
        raise _refuse(f"{where}norm_kwargs", norm, "which changes LayerNorm beyond its eps")
    if "eps" in norm:
        out["norm_eps"] = _ratio(norm["eps"], f"{where}norm_kwargs.eps")
    act = _section(cfg.get("act_kwargs"), f"{where}act_kwargs")
    if act and (quick_gelu or set(act) != {"approximate"} or act["approximate"] not in ("none", "tanh")):
        raise _refuse(f"{where}act_kwargs", act, "an activation clipforge does not implement")
    if act:
        out["gelu_approximate"] = act["approximate"]
    return out


def _vision(cfg: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    _check_unsupported(cfg, _UNSUPPORTED_VISION, "vision_cfg.")
    known = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs", "act_kwargs",
             *_VIT_OPTIONS, *_UNSUPPORTED_VISION, *_IGNORED_VISION}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise _refuse(f"vision_cfg.{unknown[0]}", cfg[unknown[0]], "an option clipforge does not know")
    width = _count(cfg.get("width", 768), "vision_cfg.width")
    head_width = _count(cfg.get("head_width", 64), "vision_cfg.head_width")
    layers, image_size = cfg.get("layers", 12), _square(cfg.get("image_size", 224), "vision_cfg.image_size")
    if isinstance(layers, (list, tuple)):  # ModifiedResNet: open_clip ignores the ViT options
        return {"type": "resnet", "image_size": image_size, "width": width, "heads": width * 32 // head_width,
                "layers": [_count(n, f"vision_cfg.layers[{i}]") for i, n in enumerate(layers)]}
    layers = _count(layers, "vision_cfg.layers")
    if width % head_width:
        raise _refuse("vision_cfg.head_width", head_width, f"which does not divide the width {width}")
    vision = {"type": "vit", "image_size": image_size, "patch_size": _square(cfg.get("patch_size", 16),
                                                                              "vision_cfg.patch_size"),
              "width": width, "layers": layers, "heads": width // head_width,
              "mlp_ratio": _ratio(cfg.get("mlp_ratio", 4.0), "vision_cfg.mlp_ratio")}
    vision.update({key: cfg[key] for key in _VIT_OPTIONS if key in cfg})
    if vision.get("pool_type") == "none":
        raise _refuse("vision_cfg.pool_type", "none", "which returns tokens, not an embedding")
    vision.update(_norm_and_act(cfg, "vision_cfg.", quick_gelu))
    return vision


def _text(cfg: dict[str, Any], quick_gelu: bool, custom_text: bool) -> dict[str, Any]:
    _check_unsupported(cfg, _UNSUPPORTED_TEXT, "text_cfg.")
    known = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs", "act_kwargs",
             *_TEXT_OPTIONS, *_UNSUPPORTED_TEXT, *_IGNORED_TEXT}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise _refuse(f"text_cfg.{unknown[0]}", cfg[unknown[0]], "an option clipforge does not know")
    defaults = {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12, "heads": 8}
    text: dict[str, Any] = {key: _count(cfg.get(key, default), f"text_cfg.{key}") for key, default in defaults.items()}
    text["mlp_ratio"] = _ratio(cfg.get("mlp_ratio", 4.0), "text_cfg.mlp_ratio")
    text.update({key: cfg[key] for key in _TEXT_OPTIONS if key in cfg and cfg[key] is not None})
    if text.get("pool_type") == "none":
        raise _refuse("text_cfg.pool_type", "none", "which returns tokens, not an embedding")
    if text.get("embed_cls") and not custom_text:
        raise _refuse("text_cfg.embed_cls", True, "which open_clip's CLIP class cannot run (only CustomTextCLIP)")
    text.update(_norm_and_act(cfg, "text_cfg.", quick_gelu))
    return text


def model_config_from_open_clip(model_cfg: dict[str, Any], name: str,
                                preprocess_cfg: dict[str, Any] | None = None) -> ModelConfig:
    """A clipforge ModelConfig from an open_clip model config (``model_configs/*.json`` or ``model_cfg``)."""
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"open_clip config for '{name}' must be a JSON object, got {type(model_cfg).__name__}")
    _check_unsupported(model_cfg, _UNSUPPORTED_MODEL, "")
    unknown = sorted(set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text",
                                       "init_logit_scale", *_UNSUPPORTED_MODEL})
    if unknown:
        raise _refuse(unknown[0], model_cfg[unknown[0]], "an option clipforge does not know")
    quick_gelu = _flag(model_cfg.get("quick_gelu", False), "quick_gelu")
    custom_text = _flag(model_cfg.get("custom_text", False), "custom_text")
    data = {"embed_dim": _count(model_cfg.get("embed_dim", 512), "embed_dim"), "quick_gelu": quick_gelu,
            "custom_text": custom_text,
            "vision": _vision(dict(_section(model_cfg.get("vision_cfg"), "vision_cfg")), quick_gelu),
            "text": _text(dict(_section(model_cfg.get("text_cfg"), "text_cfg")), quick_gelu, custom_text)}
    if preprocess_cfg:
        checked = preprocess_kwargs(preprocess_cfg)  # names the preprocess_cfg field; "random" becomes bicubic
        data["preprocess"] = {key: checked[key] for key in ("mean", "std", "interpolation", "resize_mode",
                                                            "fill_color") if preprocess_cfg.get(key) is not None}
    try:
        return config_from_dict(data, name)
    except ConfigError as error:  # it names the clipforge field; say where the value came from
        raise ConfigError(f"open_clip config of '{name}' is not valid: {error}") from None


def from_open_clip_config(data: dict[str, Any], name: str) -> ModelConfig:
    """ModelConfig (preprocessing included) from an ``open_clip_config.json``."""
    if not isinstance(data, dict):
        raise ConfigError(f"open_clip_config.json of '{name}' must be a JSON object")
    return model_config_from_open_clip(data.get("model_cfg", data), name, data.get("preprocess_cfg") or {})


def is_open_clip_model_cfg(data: Any) -> bool:
    """Whether a dict is in open_clip's schema (rather than clipforge's)."""
    return isinstance(data, dict) and ("model_cfg" in data or "vision_cfg" in data or "text_cfg" in data)


def _options_out(config: ModelConfig, tower: str, options: tuple[str, ...]) -> dict[str, Any]:
    """A tower's non-default options in open_clip's spelling (eps and GELU flavour as kwargs)."""
    data = config.to_dict()[tower]
    out = {key: data[key] for key in options if key in data}
    if data.get("norm_eps", 1e-5) != 1e-5:
        out["norm_kwargs"] = {"eps": data["norm_eps"]}
    if data.get("gelu_approximate", "none") != "none":
        out["act_kwargs"] = {"approximate": data["gelu_approximate"]}
    return out


def to_open_clip_config(config: ModelConfig) -> dict[str, Any]:
    """``open_clip_config.json`` content (model_cfg and preprocess_cfg) for a clipforge config."""
    if config.vision is None or config.text is None:
        raise ConfigError("open_clip's format holds two-tower models only; save one-tower models with "
                              "format='clipforge' or 'hf'")
    if config.text.is_cbow:
        raise ConfigError("open_clip has no CBOW text encoder (text.encoder = 'cbow'); save this model with "
                          "format='clipforge'")
    vision, text = config.vision, config.text
    if vision.is_resnet:
        vision_cfg: dict[str, Any] = {"image_size": vision.image_size, "layers": list(vision.layers),
                                      "width": vision.width, "head_width": vision.width * 32 // vision.heads}
    else:
        vision_cfg = {"image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
                      "patch_size": vision.patch_size, "head_width": vision.width // vision.heads,
                      "mlp_ratio": vision.mlp_ratio}
        vision_cfg.update(_options_out(config, "vision", _VIT_OPTIONS))
    text_cfg: dict[str, Any] = {"context_length": text.context_length, "vocab_size": text.vocab_size,
                                "width": text.width, "heads": text.heads, "layers": text.layers,
                                "mlp_ratio": text.mlp_ratio, **_options_out(config, "text", _TEXT_OPTIONS)}
    model_cfg = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision_cfg,
                 "text_cfg": text_cfg}
    if config.custom_text:
        model_cfg["custom_text"] = True
    pre = config.preprocess
    preprocess_cfg = {"size": vision.image_size, "mode": "RGB", "mean": list(pre.mean), "std": list(pre.std),
                      "interpolation": pre.interpolation, "resize_mode": pre.resize_mode,
                      "fill_color": pre.fill_color}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


