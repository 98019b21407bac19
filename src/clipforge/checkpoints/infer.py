"""Infer a ModelConfig from an OpenAI-layout state dict, the way OpenAI's build_model does.

Head counts cannot be read from weights; like OpenAI we assume 64-wide heads (true for all
released models). Formats that carry a config (clipforge, open_clip hub, Hugging Face) do
not need this.
"""

from __future__ import annotations

import math
import re

import torch

from clipforge.errors import CheckpointError
from clipforge.models.config import ModelConfig, config_from_dict

HEAD_WIDTH = 64


def _heads(width: int) -> int:
    return width // HEAD_WIDTH if width % HEAD_WIDTH == 0 and width >= HEAD_WIDTH else 1


def _count(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in state_dict if (m := regex.match(key))})


def _mlp_ratio(state_dict: dict[str, torch.Tensor], prefix: str, width: int) -> float:
    key = f"{prefix}resblocks.0.mlp.c_fc.weight"
    return state_dict[key].shape[0] / width if key in state_dict else 4.0


def infer_config(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True, name: str = "inferred") -> ModelConfig:
    """Architecture of OpenAI/open_clip-layout weights."""
    required = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight",
                "visual.conv1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"weights lack {', '.join(missing)}, so they are not in OpenAI's CLIP layout; "
            "pass a Hugging Face folder, an open_clip folder with its config, or a clipforge checkpoint"
        )
    text_width = state_dict["ln_final.weight"].shape[0]
    text = {
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "width": text_width,
        "layers": _count(state_dict, r"transformer\.resblocks\.(\d+)\."),
        "heads": _heads(text_width),
        "mlp_ratio": _mlp_ratio(state_dict, "transformer.", text_width),
    }
    conv1 = state_dict["visual.conv1.weight"]
    if "visual.proj" in state_dict:
        width, patch = conv1.shape[0], conv1.shape[-1]
        grid = round(math.sqrt(state_dict["visual.positional_embedding"].shape[0] - 1))
        vision = {"type": "vit", "image_size": patch * grid, "patch_size": patch, "width": width,
                  "layers": _count(state_dict, r"visual\.transformer\.resblocks\.(\d+)\."), "heads": _heads(width),
                  "mlp_ratio": _mlp_ratio(state_dict, "visual.transformer.", width)}
    elif "visual.attnpool.positional_embedding" in state_dict:
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round(math.sqrt(state_dict["visual.attnpool.positional_embedding"].shape[0] - 1))
        layers = [_count(state_dict, rf"visual\.layer{stage}\.(\d+)\.") for stage in (1, 2, 3, 4)]
        vision = {"type": "resnet", "image_size": grid * 32, "layers": layers, "width": width,
                  "heads": width * 32 // HEAD_WIDTH}
    else:
        raise CheckpointError("weights have neither 'visual.proj' (ViT) nor 'visual.attnpool' (ResNet); "
                              "they are not a CLIP image tower clipforge knows")
    embed_dim = state_dict["text_projection"].shape[1]
    return config_from_dict({"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision": vision, "text": text}, name)
