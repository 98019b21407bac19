"""Image preprocessing: OpenAI CLIP's exact ``preprocess``, open_clip's resize modes, no torchvision."""

from clipforge.transforms.image import (
    OPENAI_MEAN,
    OPENAI_STD,
    RESIZE_MODES,
    ImageTransform,
    image_transform,
    load_image,
    preprocess_kwargs,
    to_pil,
)

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "RESIZE_MODES", "ImageTransform", "image_transform", "load_image",
           "preprocess_kwargs", "to_pil"]
