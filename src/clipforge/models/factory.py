"""Build models by name or config file."""

from __future__ import annotations

import difflib
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from clipforge.errors import UnknownModelError
from clipforge.models.clip import CLIP
from clipforge.models.config import ModelConfig, config_from_file

# OpenAI's own spellings map onto our file names.
ALIASES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
           "ViT-L/14@336px": "ViT-L-14-336", "ViT-L-14-336px": "ViT-L-14-336"}


@lru_cache(maxsize=None)
def _builtin_configs() -> dict[str, ModelConfig]:
    folder = resources.files("clipforge.models") / "configs"
    configs = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            with resources.as_file(entry) as path:
                configs[entry.name[:-5]] = config_from_file(path)
    return configs


def available_models() -> list[str]:
    """Names accepted by create_model (built-in architectures)."""
    return sorted(_builtin_configs())


def get_model_config(name_or_path: str | Path) -> ModelConfig:
    """A built-in architecture by name (OpenAI spellings accepted) or a user's JSON config file."""
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    configs = _builtin_configs()
    if name in configs:
        return configs[name]
    if str(name).endswith(".json") or Path(name).is_file():
        return config_from_file(name)
    close = difflib.get_close_matches(name, list(configs), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model '{name_or_path}'.{hint} Known models: {', '.join(available_models())}; "
        "or pass the path of a JSON config file"
    )


def create_model(name_or_config: str | Path | ModelConfig, *, quick_gelu: bool | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CLIP:
    """A randomly initialised CLIP (OpenAI's init scheme) for a named or custom architecture."""
    config = name_or_config if isinstance(name_or_config, ModelConfig) else get_model_config(name_or_config)
    if quick_gelu is not None and quick_gelu != config.quick_gelu:
        config = config.replace(quick_gelu=quick_gelu, name=config.name)
    model = CLIP(config)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
