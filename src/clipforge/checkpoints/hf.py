"""Hugging Face CLIPModel <-> OpenAI layout: key renaming, q/k/v split, projection transposes.

Hugging Face's CLIPModel has a ViT image tower only, so ResNet models cannot be written in
this format (the error says so).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from clipforge.errors import CheckpointError
from clipforge.models.config import ModelConfig, config_from_dict

LAYER_NORM_EPS = 1e-5
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


def openai_to_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    if config.vision.is_resnet:
        raise CheckpointError("Hugging Face's CLIPModel has no ResNet image tower; save ResNet models with "
                              "format='clipforge' or 'open_clip'")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
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


def _act(config: ModelConfig) -> str:
    return "quick_gelu" if config.quick_gelu else "gelu"


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    vision, text = config.vision, config.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio), "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads, "max_position_embeddings": text.context_length,
            "hidden_act": _act(config), "layer_norm_eps": LAYER_NORM_EPS, "projection_dim": config.embed_dim,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio), "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads, "image_size": vision.image_size, "patch_size": vision.patch_size,
            "num_channels": 3, "hidden_act": _act(config), "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": config.embed_dim,
        },
    }


def from_hf_config(data: dict[str, Any], name: str) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json (CLIPModel defaults fill gaps, as transformers does)."""
    text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": LAYER_NORM_EPS, **(data.get("text_config") or {})}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "num_channels": 3,
              "layer_norm_eps": LAYER_NORM_EPS, **(data.get("vision_config") or {})}
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"Hugging Face config uses activations {sorted(acts)}; clipforge supports "
                              "'quick_gelu' or 'gelu' used by both towers")
    for tower, cfg in (("text_config", text), ("vision_config", vision)):
        if abs(cfg["layer_norm_eps"] - LAYER_NORM_EPS) > 1e-12:
            raise CheckpointError(f"Hugging Face config {tower}.layer_norm_eps is {cfg['layer_norm_eps']}; "
                                  f"clipforge's CLIP uses {LAYER_NORM_EPS} as OpenAI does")
    if vision["num_channels"] != 3:
        raise CheckpointError("Hugging Face config vision_config.num_channels must be 3 (RGB)")
    return config_from_dict({
        "embed_dim": data.get("projection_dim", 512),
        "quick_gelu": acts == {"quick_gelu"},
        "vision": {"type": "vit", "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                   "width": vision["hidden_size"], "layers": vision["num_hidden_layers"],
                   "heads": vision["num_attention_heads"],
                   "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
        "text": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                 "width": text["hidden_size"], "layers": text["num_hidden_layers"],
                 "heads": text["num_attention_heads"], "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }, name)


def to_hf_preprocessor_config(config: ModelConfig) -> dict[str, Any]:
    """CLIPImageProcessor settings equal to OpenAI's preprocess at this model's resolution."""
    from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

    size = config.vision.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_MEAN),
            "image_std": list(OPENAI_STD), "do_convert_rgb": True}
