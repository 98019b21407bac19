"""Reading and writing every public CLIP checkpoint format.

The names are imported on first use (PEP 562): ``clipforge.checkpoints.atomic`` and ``files`` are
torch-free and used by the onnxruntime path, which must not import torch through this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clipforge.lazy import lazy_attributes

_LAZY = {"load": "api", "model_transform": "api", "released_models": "api", "save": "api",
         "RELEASED": "download", "default_cache_dir": "download", "download_verified": "download",
         "create_model_and_transforms": "open_clip_api", "create_model_from_pretrained": "open_clip_api",
         "get_pretrained": "pretrained", "list_pretrained": "pretrained", "list_pretrained_tags": "pretrained"}

__all__ = ["RELEASED", "create_model_and_transforms", "create_model_from_pretrained", "default_cache_dir",
           "download_verified", "get_pretrained", "list_pretrained", "list_pretrained_tags", "load",
           "model_transform", "released_models", "save"]

if TYPE_CHECKING:
    from clipforge.checkpoints.api import load, model_transform, released_models, save
    from clipforge.checkpoints.download import RELEASED, default_cache_dir, download_verified
    from clipforge.checkpoints.open_clip_api import create_model_and_transforms, create_model_from_pretrained
    from clipforge.checkpoints.pretrained import get_pretrained, list_pretrained, list_pretrained_tags


__getattr__ = lazy_attributes(__name__, _LAZY, "clipforge.checkpoints.")
