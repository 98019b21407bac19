"""Architecture configuration as data: one JSON file per model, validated at the edge.

A config file looks like::

    {"embed_dim": 512, "quick_gelu": true,
     "vision": {"type": "vit", "image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12},
     "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12, "heads": 8}}

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


@dataclass(frozen=True)
class VisionConfig:
    type: str  # "vit" or "resnet"
    image_size: int
    width: int  # ViT: token width; ResNet: stem/base channel count
    layers: int | tuple[int, int, int, int]  # ViT: depth; ResNet: blocks per stage
    heads: int  # ViT: attention heads; ResNet: attention-pool heads
    patch_size: int | None = None  # ViT only
    mlp_ratio: float = 4.0

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


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = True  # OpenAI's weights need QuickGELU; plain GELU silently loses accuracy
    name: str = field(default="custom", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        if self.vision.is_resnet:
            data["vision"]["layers"] = list(self.vision.layers)
            data["vision"].pop("patch_size")
        return data

    def replace(self, **changes: Any) -> "ModelConfig":
        name = changes.pop("name", self.name)
        return config_from_dict({**self.to_dict(), **changes}, name=name)


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


def _positive_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(where, f"must be a positive number, got {value!r}")
    return float(value)


def _vision_from_dict(data: Any) -> VisionConfig:
    if not isinstance(data, dict):
        raise _fail("vision", "must be an object with type, image_size, width, layers and heads")
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
    return VisionConfig("vit", image_size, width, layers, heads, patch, mlp_ratio)


def _text_from_dict(data: Any) -> TextConfig:
    if not isinstance(data, dict):
        raise _fail("text", "must be an object with context_length, vocab_size, width, layers and heads")
    _check_keys(data, tuple(f.name for f in fields(TextConfig)), "text")
    values = {**asdict(TextConfig()), **data}
    config = TextConfig(
        context_length=_positive_int(values["context_length"], "text.context_length"),
        vocab_size=_positive_int(values["vocab_size"], "text.vocab_size"),
        width=_positive_int(values["width"], "text.width"),
        layers=_positive_int(values["layers"], "text.layers"),
        heads=_positive_int(values["heads"], "text.heads"),
        mlp_ratio=_positive_float(values["mlp_ratio"], "text.mlp_ratio"),
    )
    if config.width % config.heads:
        raise _fail("text.heads", f"must divide text.width {config.width}, got {config.heads}")
    if config.context_length < 2:
        raise _fail("text.context_length", "must be at least 2 (room for [SOS] and [EOS])")
    return config


def config_from_dict(data: Any, name: str = "custom") -> ModelConfig:
    """Validate a plain dict (parsed JSON) into a ModelConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
    _check_keys(data, ("embed_dim", "vision", "text", "quick_gelu"), "")
    if "embed_dim" not in data:
        raise _fail("embed_dim", "is required (the size of the joint image-text space, e.g. 512)")
    quick_gelu = data.get("quick_gelu", True)
    if not isinstance(quick_gelu, bool):
        raise _fail("quick_gelu", f"must be true or false, got {quick_gelu!r}")
    return ModelConfig(
        embed_dim=_positive_int(data["embed_dim"], "embed_dim"),
        vision=_vision_from_dict(data.get("vision")),
        text=_text_from_dict(data.get("text", {})),
        quick_gelu=quick_gelu,
        name=name,
    )


def config_from_file(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model config file '{path}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model config file '{path}' is not valid JSON ({error}); fix the file") from None
    try:
        return config_from_dict(data, name=path.stem)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
