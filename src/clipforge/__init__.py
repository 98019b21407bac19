"""clipforge: CLIP (Radford et al., 2021) as real software.

Ports from OpenAI's package by changing one import::

    import clipforge as clip
    model, preprocess = clip.load("ViT-B-32")
    text = clip.tokenize(["a dog", "a cat"])

The public names are imported on first use (PEP 562), so ``import clipforge.runtime`` (the
onnxruntime path) and the command line's argument parsing never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clipforge.lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "create_model_and_transforms": "clipforge.checkpoints",
    "create_model_from_pretrained": "clipforge.checkpoints",
    "list_pretrained": "clipforge.checkpoints",
    "list_pretrained_tags": "clipforge.checkpoints",
    "load": "clipforge.checkpoints",
    "released_models": "clipforge.checkpoints",
    "save": "clipforge.checkpoints",
    "ClipforgeError": "clipforge.errors",
    "CLIP": "clipforge.models",
    "ModelConfig": "clipforge.models",
    "available_models": "clipforge.models",
    "create_model": "clipforge.models",
    "get_model_config": "clipforge.models",
    "decode": "clipforge.tokenizer",
    "tokenize": "clipforge.tokenizer",
    "get_tokenizer": "clipforge.tokenizer.factory",
    "image_transform": "clipforge.transforms",
    "load_image": "clipforge.transforms",
}

__all__ = ["CLIP", "ClipforgeError", "ModelConfig", "available_models", "create_model", "create_model_and_transforms",
           "create_model_from_pretrained", "decode", "get_model_config", "get_tokenizer", "image_transform",
           "list_pretrained", "list_pretrained_tags", "load", "load_image", "released_models", "save", "tokenize"]

if TYPE_CHECKING:
    from clipforge.checkpoints import (
        create_model_and_transforms,
        create_model_from_pretrained,
        list_pretrained,
        list_pretrained_tags,
        load,
        released_models,
        save,
    )
    from clipforge.errors import ClipforgeError
    from clipforge.models import CLIP, ModelConfig, available_models, create_model, get_model_config
    from clipforge.tokenizer import decode, tokenize
    from clipforge.tokenizer.factory import get_tokenizer
    from clipforge.transforms import image_transform, load_image


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
