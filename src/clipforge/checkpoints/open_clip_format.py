"""open_clip's hub layout: ``open_clip_config.json`` plus weights in OpenAI's key layout.

The config conversion itself lives in ``clipforge.models.open_clip_config``; this file holds the
file names and the key layout of open_clip's CustomTextCLIP (text tower under ``text.``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipforge.checkpoints.files import cut, read_json_object
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.config import ModelConfig
from clipforge.models.open_clip_config import (  # noqa: F401 - re-exported for the checkpoint code
    from_open_clip_config,
    is_open_clip_model_cfg,
    model_config_from_open_clip,
    to_open_clip_config,
)

CONFIG_NAME = "open_clip_config.json"
SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHTS_NAME = "open_clip_pytorch_model.bin"
TEXT_PREFIX = "text."  # CustomTextCLIP keeps its text tower under this prefix


def read_open_clip_config(path: Path, name: str) -> ModelConfig:
    """The ModelConfig of an ``open_clip_config.json``; any problem is one sentence naming the file and field."""
    data = read_json_object(path)
    try:
        return from_open_clip_config(data, name)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {cut(str(error), max(120, 295 - len(str(path))))}") from None


def from_custom_text_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CustomTextCLIP keys (``text.token_embedding.weight``) -> CLIP's (``token_embedding.weight``)."""
    if not any(key.startswith(TEXT_PREFIX) for key in state):
        return state
    return {key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key: value for key, value in state.items()}


def to_custom_text_layout(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    if not config.custom_text:
        return state
    return {key if key.startswith("visual.") or key == "logit_scale" else TEXT_PREFIX + key: value
            for key, value in state.items()}
