"""The architecture of a plain state dict (OpenAI / open_clip layout), derived only where there is no doubt.

Weights record widths, depths, patch and grid sizes, but not head counts, the activation or the
pooling. So a state dict is matched against every shipped config: the configs whose tensors
have exactly these names and shapes are the candidates. One architecture among them (up to the
activation, which the caller must state) is returned; anything else is refused with a sentence
that says which argument to pass. OpenAI's TorchScript archives are the exception: OpenAI's own
``build_model`` defines their architecture (64-wide heads, QuickGELU), so ``openai_config``
reproduces it exactly.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import torch

from clipforge.errors import CheckpointError
from clipforge.models.config import ModelConfig, config_from_dict

HEAD_WIDTH = 64


def _count(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in state_dict if (m := regex.match(key))})


def _mlp_ratio(state_dict: dict[str, torch.Tensor], prefix: str, width: int) -> float:
    key = f"{prefix}resblocks.0.mlp.c_fc.weight"
    return (state_dict[key].shape[0] + 0.5) / width if key in state_dict else 4.0  # int(width * r) == hidden


def _require(state_dict: dict[str, torch.Tensor]) -> None:
    required = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "visual.conv1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"weights lack {', '.join(missing)}, so they are not in OpenAI's CLIP layout; "
            "pass a Hugging Face folder, an open_clip folder with its config, or a clipforge checkpoint"
        )


def openai_config(state_dict: dict[str, torch.Tensor], name: str = "openai") -> ModelConfig:
    """OpenAI's ``build_model`` rule: heads = width / 64, QuickGELU, the standard CLIP towers."""
    _require(state_dict)
    if "text_projection" not in state_dict:
        raise CheckpointError("weights lack 'text_projection', so they are not an OpenAI CLIP state dict")
    text_width = state_dict["ln_final.weight"].shape[0]
    text = {"context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0], "width": text_width,
            "layers": _count(state_dict, r"transformer\.resblocks\.(\d+)\."), "heads": max(1, text_width // HEAD_WIDTH),
            "mlp_ratio": _mlp_ratio(state_dict, "transformer.", text_width)}
    conv1 = state_dict["visual.conv1.weight"]
    if "visual.proj" in state_dict:
        width, patch = conv1.shape[0], conv1.shape[-1]
        grid = round(math.sqrt(state_dict["visual.positional_embedding"].shape[0] - 1))
        vision = {"type": "vit", "image_size": patch * grid, "patch_size": patch, "width": width,
                  "layers": _count(state_dict, r"visual\.transformer\.resblocks\.(\d+)\."),
                  "heads": max(1, width // HEAD_WIDTH), "mlp_ratio": _mlp_ratio(state_dict, "visual.transformer.", width)}
    elif "visual.attnpool.positional_embedding" in state_dict:
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round(math.sqrt(state_dict["visual.attnpool.positional_embedding"].shape[0] - 1))
        layers = [_count(state_dict, rf"visual\.layer{stage}\.(\d+)\.") for stage in (1, 2, 3, 4)]
        vision = {"type": "resnet", "image_size": grid * 32, "layers": layers, "width": width,
                  "heads": width * 32 // HEAD_WIDTH}
    else:
        raise CheckpointError("weights have neither 'visual.proj' (ViT) nor 'visual.attnpool' (ResNet); "
                              "they are not a CLIP image tower clipforge knows")
    return config_from_dict({"embed_dim": state_dict["text_projection"].shape[1], "quick_gelu": True,
                             "vision": vision, "text": text}, name)


def shape_signature(state_dict: dict[str, torch.Tensor]) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((key, tuple(value.shape)) for key, value in state_dict.items()
                     if not key.endswith("num_batches_tracked") and key != "logit_scale")


@lru_cache(maxsize=None)
def _signature_of(name: str) -> frozenset[tuple[str, tuple[int, ...]]]:
    from clipforge.models.clip import CLIP
    from clipforge.models.factory import get_model_config

    with torch.device("meta"):
        return shape_signature(CLIP(get_model_config(name)).state_dict())


def _fingerprint(state_dict: dict[str, torch.Tensor]) -> tuple:
    """Cheap keys that most configs differ in, to build only the few plausible ones on the meta device."""
    return (tuple(state_dict["visual.conv1.weight"].shape), tuple(state_dict["token_embedding.weight"].shape),
            tuple(state_dict["positional_embedding"].shape))


def _config_fingerprint(config: ModelConfig) -> tuple | None:
    vision, text = config.vision, config.text
    if vision is None or text is None:
        return None
    conv1 = (vision.width // 2, 3, 3, 3) if vision.is_resnet else (vision.width, 3, vision.patch_size, vision.patch_size)
    return conv1, (text.vocab_size, text.width), (text.num_positions, text.width)


def matching_configs(state_dict: dict[str, torch.Tensor]) -> list[ModelConfig]:
    """Shipped configs whose weights have exactly these names and shapes."""
    from clipforge.models.factory import builtin_configs

    fingerprint, signature = _fingerprint(state_dict), shape_signature(state_dict)
    return [config for name, config in sorted(builtin_configs().items())
            if _config_fingerprint(config) == fingerprint and _signature_of(name) == signature]


def _describe(state_dict: dict[str, torch.Tensor]) -> str:
    conv1 = tuple(state_dict["visual.conv1.weight"].shape)
    image = (f"ViT width {conv1[0]}, patch {conv1[-1]}" if "visual.proj" in state_dict
             else f"ResNet stem {conv1[0]}")
    return f"image tower {image}; text width {state_dict['ln_final.weight'].shape[0]}"


def infer_config(state_dict: dict[str, torch.Tensor], quick_gelu: bool | None = None,
                 name: str = "inferred", source: str = "the checkpoint") -> ModelConfig:
    """The one shipped architecture these weights fit, with the caller's activation; or a refusal."""
    _require(state_dict)
    candidates = matching_configs(state_dict)
    if not candidates:
        raise CheckpointError(
            f"{source} is a plain state dict ({_describe(state_dict)}) that matches none of clipforge's "
            "architectures, and head counts, pooling and activation cannot be read from weights; pass "
            "model='NAME' (clipforge.available_models()), model=<config dict or JSON file>, or model='openai' "
            "for OpenAI's rule (64-wide heads, QuickGELU)"
        )
    names = sorted({config.name for config in candidates})
    if len({config.replace(quick_gelu=True, name="x") for config in candidates}) > 1:
        raise CheckpointError(f"{source} fits several architectures that compute different functions "
                              f"({', '.join(names)}); pass model= with the right one")
    if quick_gelu is None:
        raise CheckpointError(
            f"{source} is a plain state dict that fits {' / '.join(names)}, but weights do not record the "
            "activation; pass quick_gelu=True (OpenAI-trained weights, open_clip's '-quickgelu' models) or "
            f"quick_gelu=False (most open_clip models), or model='{names[0]}'"
        )
    exact = [config for config in candidates if config.quick_gelu == quick_gelu]
    if exact:
        return exact[0]
    return candidates[0].replace(quick_gelu=quick_gelu, name=f"{candidates[0].name}{'-quickgelu' * quick_gelu}")
