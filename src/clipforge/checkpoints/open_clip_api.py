"""open_clip's factory functions with open_clip's signatures, so open_clip code ports by changing an import.

``create_model_and_transforms`` / ``create_model_from_pretrained`` accept what open_clip accepts:
an architecture name with a pretrained tag or file, ``hf-hub:ORG/REPO`` and ``local-dir:PATH``,
and the ``force_*`` overrides. Two differences: the models are clipforge's (``model(image, text)``
returns OpenAI's logits pair; ``encode_image`` / ``encode_text`` are the same), and the training
transform is the CLIP paper's random square crop rather than open_clip's RandomResizedCrop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from clipforge.checkpoints.api import load, model_transform
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.models.clip import CLIP
from clipforge.models.factory import create_model as create_random_model
from clipforge.transforms import image_transform

_PRECISIONS = {"fp32": torch.float32, "amp": torch.float32, "amp_bf16": torch.float32, "amp_bfloat16": torch.float32,
               "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16, "pure_fp16": torch.float16}


def _dtype(precision: str) -> torch.dtype:
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    return _PRECISIONS[precision]


def _build(model_name: str, pretrained: str | None, precision: str, device: str | torch.device, jit: bool,
           force_quick_gelu: bool, force_image_size: int | None, force_preprocess_cfg: dict | None,
           force_context_length: int | None, cache_dir: str | None, require_pretrained: bool) -> CLIP:
    if jit:
        raise ClipforgeError("clipforge does not build TorchScript models; pass jit=False (the default)")
    overrides = {"quick_gelu": True if force_quick_gelu else None, "image_size": force_image_size,
                 "context_length": force_context_length, "dtype": _dtype(precision), "device": device,
                 "cache_dir": cache_dir}
    name = str(model_name)
    if name.startswith("local-dir:"):
        model, _ = load(Path(name[len("local-dir:"):]).expanduser(), **overrides)
    elif name.startswith("hf-hub:"):
        model, _ = load(name, **overrides)
    elif pretrained:
        model, _ = load(name, pretrained=pretrained, **overrides)
    else:
        if require_pretrained:
            raise ClipforgeError(f"no pretrained weights named for '{name}'; pass pretrained=TAG "
                                 "(clipforge.list_pretrained() lists them) or a checkpoint file")
        model = create_random_model(name, quick_gelu=overrides["quick_gelu"], image_size=force_image_size,
                                    context_length=force_context_length, device=device, dtype=overrides["dtype"])
    if force_preprocess_cfg:
        preprocess = {key: value for key, value in force_preprocess_cfg.items()
                      if key in ("mean", "std", "interpolation", "resize_mode", "fill_color") and value is not None}
        model.config = model.config.replace(preprocess={**model.config.to_dict().get("preprocess", {}), **preprocess},
                                            name=model.config.name)
    return model.eval()


def _train_transform(model: CLIP) -> Callable[[Any], torch.Tensor] | None:
    if model.config.vision is None:
        return None
    pre = model.config.preprocess
    return image_transform(model.config.vision.image_size, train=True, mean=pre.mean, std=pre.std,
                           interpolation=pre.interpolation)


def create_model_and_transforms(model_name: str, pretrained: str | None = None, precision: str = "fp32",
                                device: str | torch.device = "cpu", jit: bool = False, force_quick_gelu: bool = False,
                                force_custom_text: bool = False, force_patch_dropout: float | None = None,
                                force_image_size: int | None = None, force_preprocess_cfg: dict | None = None,
                                force_context_length: int | None = None, cache_dir: str | None = None,
                                **_: Any) -> tuple[CLIP, Callable | None, Callable | None]:
    """(model, train transform, eval transform), as ``open_clip.create_model_and_transforms``."""
    model = _build(model_name, pretrained, precision, device, jit, force_quick_gelu, force_image_size,
                   force_preprocess_cfg, force_context_length, cache_dir, require_pretrained=False)
    if force_patch_dropout is not None and hasattr(model.visual, "patch_dropout"):
        model.visual.patch_dropout = float(force_patch_dropout)
    return model, _train_transform(model), model_transform(model.config)


def create_model_from_pretrained(model_name: str, pretrained: str | None = None, precision: str = "fp32",
                                 device: str | torch.device = "cpu", jit: bool = False, force_quick_gelu: bool = False,
                                 force_custom_text: bool = False, force_image_size: int | None = None,
                                 force_preprocess_cfg: dict | None = None, force_context_length: int | None = None,
                                 return_transform: bool = True, cache_dir: str | None = None, **_: Any):
    """(model, eval transform) — or the model alone with ``return_transform=False`` — with weights required."""
    model = _build(model_name, pretrained, precision, device, jit, force_quick_gelu, force_image_size,
                   force_preprocess_cfg, force_context_length, cache_dir, require_pretrained=True)
    return (model, model_transform(model.config)) if return_transform else model
