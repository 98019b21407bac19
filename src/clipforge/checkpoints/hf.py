"""Hugging Face CLIP checkpoints <-> clipforge: config translation, key renaming, q/k/v split, transposes.

Three transformers classes hold a CLIP embedding model, and only these load: ``CLIPModel``,
``CLIPVisionModelWithProjection`` (a ``ModelConfig`` with ``text=None``) and
``CLIPTextModelWithProjection`` (``vision=None``). Anything else (plain ``CLIPVisionModel``, which
has no projection, SigLIP, ...) is refused in one sentence from config.json, before its weights
could produce a misleading "missing keys" message. The reference is transformers' modeling_clip.py:
per-tower ``layer_norm_eps`` and ``hidden_act``, any head count, any ``intermediate_size``, and its
text pooling rule (``eos_token_id == 2``: argmax of the ids; otherwise the first ``eos_token_id``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.files import (cut, field_error, first_line, optional_object, positive_int,
                                         positive_number, read_json_object, short)
from clipforge.checkpoints.hf_preprocess import RESAMPLE, preprocess_from_hf  # noqa: F401 - re-exported
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.config import ModelConfig, config_from_dict

LAYER_NORM_EPS = 1e-5
CLIP_MODEL, VISION_MODEL, TEXT_MODEL = "CLIPModel", "CLIPVisionModelWithProjection", "CLIPTextModelWithProjection"
_MODEL_TYPES = {CLIP_MODEL: "clip", VISION_MODEL: "clip_vision_model", TEXT_MODEL: "clip_text_model"}
_LOADABLE = ("only CLIPModel, CLIPVisionModelWithProjection and CLIPTextModelWithProjection are CLIP checkpoints "
             "clipforge loads")
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
# transformers' defaults (configuration_clip.py): a config.json omits whatever equals them.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
                  "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                  "hidden_act": "quick_gelu", "layer_norm_eps": LAYER_NORM_EPS, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": LAYER_NORM_EPS}
_ACTS = {"quick_gelu": (True, "none"), "gelu": (False, "none"), "gelu_pytorch_tanh": (False, "tanh")}
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "num_channels")
# (OpenAI name inside a residual block, Hugging Face name inside an encoder layer)
_BLOCK_RENAMES = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
_PLAIN_RENAMES = {  # OpenAI key -> Hugging Face key (same tensor)
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: the real attribute name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TOWERS = (("transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers."))
_TRANSPOSED = (("text_projection", "text_projection.weight"), ("visual.proj", "visual_projection.weight"))


def is_hf_state_dict(state_dict: dict[str, Any]) -> bool:
    return any(key.startswith(("text_model.", "vision_model.")) for key in state_dict)


def hf_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse_plain = {hf: oa for oa, hf in _PLAIN_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue  # a buffer Hugging Face recomputes
        if key in inverse_plain:
            out[inverse_plain[key]] = value
            continue
        transposed = next((oa for oa, hf in _TRANSPOSED if hf == key), None)
        if transposed:
            out[transposed] = value.t().contiguous()
            continue
        for oa_prefix, hf_prefix in _TOWERS:
            match = re.match(re.escape(hf_prefix) + r"(\d+)\.(.*)", key)
            if not match:
                continue
            block, rest = f"{oa_prefix}{match.group(1)}.", match.group(2)
            proj = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault(f"{block}attn.in_proj_{proj.group(2)}", {})[proj.group(1)] = value
            else:
                for oa_name, hf_name in _BLOCK_RENAMES:
                    if rest.startswith(hf_name):
                        out[block + oa_name + rest[len(hf_name):]] = value
                        break
                else:
                    raise CheckpointError(f"Hugging Face key '{key}' is not part of a standard CLIPModel")
            break
        else:
            raise CheckpointError(f"Hugging Face key '{key}' is not part of a standard CLIPModel")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"Hugging Face checkpoint lacks some of q/k/v for '{key}'")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------- reading

def hf_architecture(data: dict[str, Any], weight_keys: set[str] | None = None, source: str = "config.json") -> str:
    """Which loadable class config.json describes (weights decide when ``architectures`` is absent)."""
    archs = data.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise field_error(source, "architectures", data.get("architectures"), "a list of class names")
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise field_error(source, "model_type", model_type, "a string")
    arch = next((a for a in archs if a in _MODEL_TYPES), None)
    if arch is None and not archs:  # older configs name only the model type
        if model_type == "clip":
            arch = CLIP_MODEL
        elif model_type in ("clip_vision_model", "clip_text_model"):
            vision = model_type == "clip_vision_model"
            projection = "visual_projection.weight" if vision else "text_projection.weight"
            with_projection = weight_keys is None or projection in weight_keys
            arch = (VISION_MODEL if vision else TEXT_MODEL) if with_projection else \
                ("CLIPVisionModel" if vision else "CLIPTextModel")
    if arch not in _MODEL_TYPES:
        named = archs[0] if archs else arch
        if named is None:
            what = f"a Hugging Face model_type {short(model_type)}" if model_type else "no Hugging Face model type"
        else:
            what = f"a Hugging Face {cut(named, 40)}" + (f" (model_type {short(model_type)})" if model_type else "")
        if named in ("CLIPVisionModel", "CLIPTextModel"):
            what += " without a projection into the joint embedding space"
        raise CheckpointError(f"{source} describes {what}; {_LOADABLE}")
    if model_type not in (None, _MODEL_TYPES[arch]):
        raise CheckpointError(f"{source} names architecture {arch} but model_type {model_type!r} "
                              f"(expected {_MODEL_TYPES[arch]!r}); fix config.json")
    return arch


def _activation(cfg: dict[str, Any], where: str, source: str) -> tuple[bool, str]:
    act = cfg["hidden_act"]
    if not isinstance(act, str) or act not in _ACTS:
        raise CheckpointError(f"{source} sets {where}hidden_act to {short(act)}; clipforge's CLIP supports "
                              f"{', '.join(repr(a) for a in _ACTS)}")
    return _ACTS[act]


def _mlp_ratio(intermediate: int, width: int, source: str = "config.json") -> float:
    """A ratio with ``int(width * ratio) == intermediate`` (clipforge's and open_clip's MLP width rule), checked."""
    for ratio in (intermediate / width, (intermediate + 0.5) / width):
        if int(width * ratio) == intermediate:
            return ratio
    raise CheckpointError(f"{source}: intermediate_size {intermediate} cannot be expressed as a ratio of width "
                          f"{width}")


def _square(value: Any, field: str, source: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{source} sets {field} to {short(value)}; clipforge's ViT takes square values only")
        value = value[0]
    return positive_int(value, field, source)


def _check_tower(cfg: dict[str, Any], where: str, source: str) -> None:
    """Every field the tower translation reads has the JSON type transformers expects."""
    for key in _INT_FIELDS:
        if key in cfg:
            positive_int(cfg[key], where + key, source)
    positive_number(cfg["layer_norm_eps"], where + "layer_norm_eps", source)


def _text_section(cfg: dict[str, Any], where: str, source: str) -> tuple[dict[str, Any], bool]:
    _check_tower(cfg, where, source)
    quick, approx = _activation(cfg, where, source)
    eos = cfg["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise CheckpointError(f"{source} sets {where}eos_token_id to {eos!r}; the CLIP text tower pools at one "
                              "integer token id")
    pool = {"pool_type": "argmax"} if eos == 2 else {"pool_type": "eos", "eos_id": eos}  # transformers' rule
    return {"context_length": cfg["max_position_embeddings"], "vocab_size": cfg["vocab_size"],
            "width": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "heads": cfg["num_attention_heads"],
            "mlp_ratio": _mlp_ratio(cfg["intermediate_size"], cfg["hidden_size"], source),
            "norm_eps": cfg["layer_norm_eps"], "gelu_approximate": approx, **pool}, quick


def _vision_section(cfg: dict[str, Any], where: str, source: str) -> tuple[dict[str, Any], bool]:
    _check_tower(cfg, where, source)
    quick, approx = _activation(cfg, where, source)
    if cfg["num_channels"] != 3:
        raise CheckpointError(f"{source} sets {where}num_channels to {cfg['num_channels']}; CLIP takes RGB (3)")
    return {"type": "vit", "image_size": _square(cfg["image_size"], where + "image_size", source),
            "patch_size": _square(cfg["patch_size"], where + "patch_size", source), "width": cfg["hidden_size"],
            "layers": cfg["num_hidden_layers"], "heads": cfg["num_attention_heads"],
            "mlp_ratio": _mlp_ratio(cfg["intermediate_size"], cfg["hidden_size"], source),
            "norm_eps": cfg["layer_norm_eps"], "gelu_approximate": approx}, quick


def _sub_config(data: dict[str, Any], key: str, defaults: dict[str, Any], source: str = "config.json"
                ) -> dict[str, Any]:
    """A CLIPModel tower config as transformers builds it: a legacy ``*_config_dict`` replaces ``*_config``."""
    legacy = data.get(f"{key}_dict")
    return {**defaults, **(legacy if isinstance(legacy, dict) else optional_object(data.get(key), key, source))}


def from_hf_config(data: dict[str, Any], name: str, processor: dict[str, Any] | None = None, *,
                   architecture: str | None = None, source: str = "config.json",
                   processor_source: str = "preprocessor_config.json") -> ModelConfig:
    """A ModelConfig from config.json (+ preprocessor_config.json), transformers' defaults filling gaps."""
    arch = architecture or hf_architecture(data, source=source)
    if "projection_dim" in data:
        positive_int(data["projection_dim"], "projection_dim", source)
    vision = text = None
    if arch == CLIP_MODEL:
        text, text_quick = _text_section(_sub_config(data, "text_config", _TEXT_DEFAULTS, source), "text_config.",
                                         source)
        vision, vision_quick = _vision_section(_sub_config(data, "vision_config", _VISION_DEFAULTS, source),
                                               "vision_config.", source)
        if text_quick != vision_quick:
            quick_tower = "text" if text_quick else "vision"
            raise CheckpointError(f"{source} uses quick_gelu in the {quick_tower} tower only; clipforge's CLIP "
                                  "needs both towers to use QuickGELU or neither")
        quick, embed_dim = text_quick, data.get("projection_dim", 512)
    elif arch == VISION_MODEL:
        vision, quick = _vision_section({**_VISION_DEFAULTS, **data}, "", source)
        embed_dim = data.get("projection_dim", _VISION_DEFAULTS["projection_dim"])
    else:
        text, quick = _text_section({**_TEXT_DEFAULTS, **data}, "", source)
        embed_dim = data.get("projection_dim", _TEXT_DEFAULTS["projection_dim"])
    preprocess = preprocess_from_hf(processor, vision["image_size"], processor_source) if processor and vision else None
    try:
        return config_from_dict({"embed_dim": embed_dim, "quick_gelu": quick, "vision": vision, "text": text,
                                 "preprocess": preprocess}, name)
    except ConfigError as error:  # it names clipforge's field; say which file holds the value
        raise CheckpointError(f"{source} does not describe a CLIP model clipforge can build ({first_line(error)}); "
                              "fix the file or download it again") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin, either possibly sharded (``*.index.json``, each shard checked)."""
    from clipforge.checkpoints.weights import read_folder_weights

    return read_folder_weights(Path(folder), _WEIGHT_NAMES)


def read_hf_folder(folder: Path, name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(clipforge config, OpenAI-layout state dict) of a Hugging Face CLIP folder, ready for load_state_dict_into."""
    folder = Path(folder)
    source = str(folder / "config.json")
    data = read_json_object(folder / "config.json")
    undecided = not data.get("architectures") and data.get("model_type") in ("clip_vision_model", "clip_text_model")
    arch = None if undecided else hf_architecture(data, source=source)  # refuse before reading any weights
    weights = read_hf_weights(folder)
    arch = arch or hf_architecture(data, set(weights), source)
    processor_path = folder / "preprocessor_config.json"
    processor = read_json_object(processor_path) if processor_path.is_file() and arch != TEXT_MODEL else None
    config = from_hf_config(data, name, processor, architecture=arch, source=source,
                            processor_source=str(processor_path))
    state = hf_to_openai(weights)
    if arch != CLIP_MODEL:  # one tower: no temperature stored, CLIP's initial one
        state.setdefault("logit_scale", torch.tensor(math.log(1 / 0.07), dtype=torch.float32))
    return config, state


# ---------------------------------------------------------------- writing

def _hf_problem(config: ModelConfig) -> str | None:
    vision, text = config.vision, config.text
    if text is not None and text.is_cbow:
        return "a CBOW text encoder (text.encoder = 'cbow')"
    if vision is not None:
        if vision.is_resnet:
            return "a ResNet image tower (Hugging Face's CLIP has no ResNet)"
        problems = [(vision.ls_init_value is not None, "layer scale (vision.ls_init_value)"),
                    (vision.no_ln_pre, "an image tower without ln_pre (vision.no_ln_pre)"),
                    (vision.pool_type != "tok", f"image pooling {vision.pool_type!r} (vision.pool_type)"),
                    (vision.attentional_pool is not False, "an attentional pooler (vision.attentional_pool)")]
        found = next((what for bad, what in problems if bad), None)
        if found:
            return found
        if config.preprocess.resize_mode == "longest":
            return "resize_mode 'longest' preprocessing (CLIPImageProcessor cannot pad to a square)"
    if text is not None:
        problems = [(text.ls_init_value is not None, "layer scale (text.ls_init_value)"),
                    (text.no_causal_mask, "bidirectional text attention (text.no_causal_mask)"),
                    (text.pool_type in ("first", "last"), f"text pooling {text.pool_type!r} (text.pool_type)"),
                    (text.pool_type == "eos" and text.eos_id == 2,
                     "text pool_type 'eos' with eos_id 2 (Hugging Face reads eos_token_id 2 as argmax pooling)"),
                    (text.embed_cls, "a text class token (text.embed_cls)"),
                    (text.proj_type != "linear", "a text tower without projection (text.proj_type 'none')"),
                    (text.proj_bias, "a text projection bias (text.proj_bias)"),
                    (text.hf_tokenizer_name is not None, "a tokenizer other than CLIP's (text.hf_tokenizer_name)")]
        return next((what for bad, what in problems if bad), None)
    return None


def check_hf_expressible(config: ModelConfig) -> None:
    """Refuse, in one sentence naming the option, a model transformers' CLIP classes would compute differently."""
    problem = _hf_problem(config)
    if problem:
        raise CheckpointError(f"Hugging Face's CLIP classes cannot express {problem}; save this model with "
                              "format='clipforge'" + ("" if config.text is not None and config.text.is_cbow else " or 'open_clip'"))


def openai_to_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    check_hf_expressible(config)
    one_tower = config.vision is None or config.text is None
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or (one_tower and key == "logit_scale"):
            continue  # *WithProjection classes have no temperature
        if key in _PLAIN_RENAMES:
            out[_PLAIN_RENAMES[key]] = value
            continue
        transposed = next((hf for oa, hf in _TRANSPOSED if oa == key), None)
        if transposed:
            out[transposed] = value.t().contiguous()
            continue
        for oa_prefix, hf_prefix in _TOWERS[::-1]:  # the vision prefix contains the text prefix
            match = re.match(re.escape(oa_prefix) + r"(\d+)\.(.*)", key)
            if not match:
                continue
            block, rest = f"{hf_prefix}{match.group(1)}.", match.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{block}self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                oa_name, hf_name = next((o, h) for o, h in _BLOCK_RENAMES if rest.startswith(o))
                out[block + hf_name + rest[len(oa_name):]] = value
            break
        else:
            raise CheckpointError(f"key '{key}' has no Hugging Face equivalent")
    return out


def _act(quick_gelu: bool, gelu_approximate: str) -> str:
    return "quick_gelu" if quick_gelu else ("gelu_pytorch_tanh" if gelu_approximate == "tanh" else "gelu")


def _tower_hf(config: ModelConfig, tower: str) -> dict[str, Any]:
    if tower == "text":
        t = config.text
        return {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                "hidden_act": _act(config.quick_gelu, t.gelu_approximate), "layer_norm_eps": t.norm_eps,
                "projection_dim": config.embed_dim, "bos_token_id": 49406, "pad_token_id": 1,
                "eos_token_id": 2 if t.pool_type == "argmax" else t.eos_id}  # 2: transformers' argmax pooling
    v = config.vision
    return {"model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": 3, "hidden_act": _act(config.quick_gelu, v.gelu_approximate),
            "layer_norm_eps": v.norm_eps, "projection_dim": config.embed_dim}


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json for CLIPModel, or the *WithProjection class of a one-tower model."""
    check_hf_expressible(config)
    if config.text is None:
        return {"architectures": [VISION_MODEL], **_tower_hf(config, "vision")}
    if config.vision is None:
        return {"architectures": [TEXT_MODEL], **_tower_hf(config, "text")}
    return {"architectures": [CLIP_MODEL], "model_type": "clip", "projection_dim": config.embed_dim,
            "logit_scale_init_value": 2.6592, "text_config": _tower_hf(config, "text"),
            "vision_config": _tower_hf(config, "vision")}


def to_hf_preprocessor_config(config: ModelConfig) -> dict[str, Any] | None:
    """CLIPImageProcessor settings equal to this model's preprocess (None for a text-only model: write no file)."""
    if config.vision is None:
        return None
    check_hf_expressible(config)
    size, pre = config.vision.image_size, config.preprocess
    resize = {"size": {"shortest_edge": size}, "do_center_crop": True} if pre.resize_mode == "shortest" else \
        {"size": {"height": size, "width": size}, "do_center_crop": False}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, **resize,
            "resample": {v: k for k, v in RESAMPLE.items()}[pre.interpolation],
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True}
