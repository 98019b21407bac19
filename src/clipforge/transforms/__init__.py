"""Image preprocessing: OpenAI CLIP's exact ``preprocess``, open_clip's resize modes, no torchvision.

The torch-free pieces (``load_image``, ``to_pil``, the mean/std constants) come from ``core`` and
the rest from ``image`` on first use, so the onnxruntime path can read images without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clipforge.lazy import lazy_attributes

from clipforge.transforms.resize import RESIZE_MODES

_LAZY = {"OPENAI_MEAN": "core", "OPENAI_STD": "core", "load_image": "core", "to_pil": "core",
         "ImageTransform": "image", "image_transform": "image", "preprocess_kwargs": "image"}

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "RESIZE_MODES", "ImageTransform", "image_transform", "load_image",
           "preprocess_kwargs", "to_pil"]

if TYPE_CHECKING:
    from clipforge.transforms.core import OPENAI_MEAN, OPENAI_STD, load_image, to_pil
    from clipforge.transforms.image import ImageTransform, image_transform, preprocess_kwargs


__getattr__ = lazy_attributes(__name__, _LAZY, "clipforge.transforms.")
