"""Build models by name or config file."""

from __future__ import annotations

import difflib
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from clipforge.errors import ConfigError, UnknownModelError
from clipforge.models.clip import CLIP
from clipforge.models.config import ModelConfig, config_from_dict, config_from_file, read_config_json
from clipforge.models.open_clip_config import from_open_clip_config, is_open_clip_model_cfg

# OpenAI's own spellings name OpenAI's models, which use QuickGELU: open_clip's "-quickgelu" configs.
ALIASES = {"ViT-B/32": "ViT-B-32-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu", "ViT-L/14": "ViT-L-14-quickgelu",
           "ViT-L/14@336px": "ViT-L-14-336-quickgelu", "ViT-L-14-336px": "ViT-L-14-336-quickgelu"}


@lru_cache(maxsize=None)
def builtin_configs() -> dict[str, ModelConfig]:
    """Shipped architectures by name: open_clip's plain-CLIP family (open_clip's names) and small CPU models."""
    folder = resources.files("clipforge.models") / "configs"
    configs = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            with resources.as_file(entry) as path:
                configs[entry.name[:-5]] = config_from_file(path)
    return configs


def available_models() -> list[str]:
    """Names accepted by create_model (built-in architectures)."""
    return sorted(builtin_configs())


def get_model_config(name_or_path: str | Path) -> ModelConfig:
    """A built-in architecture by name (OpenAI spellings accepted) or a user's JSON config file."""
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    configs = builtin_configs()
    if name in configs:
        return configs[name]
    if str(name).endswith(".json") or Path(name).is_file():
        return config_from_file(name)
    close = difflib.get_close_matches(name, list(configs), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model '{str(name_or_path)[:120]}'; {hint}`clipforge models` lists the {len(configs)} known "
        "architectures, or pass the path of a JSON config file"
    )


def resolve_config(model: str | Path | dict | ModelConfig) -> ModelConfig:
    """A ModelConfig from a name, a JSON file (clipforge's or open_clip's schema), a dict or a ModelConfig."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return from_open_clip_config(model, "custom") if is_open_clip_model_cfg(model) else config_from_dict(model)
    if not isinstance(model, (str, Path)):
        raise ConfigError(f"model must be a name, a JSON config file, a dict or a ModelConfig, got {type(model).__name__}")
    name = ALIASES.get(str(model), str(model))
    if name not in builtin_configs() and (name.endswith(".json") or Path(name).is_file()):
        path = Path(name)
        data = read_config_json(path)
        if is_open_clip_model_cfg(data):
            return from_open_clip_config(data, path.stem)
    return get_model_config(name)


def with_overrides(config: ModelConfig, *, quick_gelu: bool | None = None, image_size: int | None = None,
                   context_length: int | None = None) -> ModelConfig:
    """The config with open_clip's force_* style overrides applied (validated)."""
    changes: dict = {}
    if quick_gelu is not None and quick_gelu != config.quick_gelu:
        changes["quick_gelu"] = quick_gelu
    if image_size is not None and config.vision is not None and image_size != config.vision.image_size:
        changes["vision"] = {"image_size": image_size}
    if context_length is not None and config.text is not None and context_length != config.text.context_length:
        changes["text"] = {"context_length": context_length}
    return config.replace(name=config.name, **changes) if changes else config


def create_model(name_or_config: str | Path | dict | ModelConfig, *, quick_gelu: bool | None = None,
                 image_size: int | None = None, context_length: int | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CLIP:
    """A randomly initialised CLIP (OpenAI's init scheme) for a named or custom architecture.

    ``image_size`` / ``context_length`` change the input sizes (position tables follow).
    """
    config = with_overrides(resolve_config(name_or_config), quick_gelu=quick_gelu, image_size=image_size,
                            context_length=context_length)
    model = CLIP(config)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
