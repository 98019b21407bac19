"""Image preprocessing: OpenAI CLIP's exact ``preprocess`` (and the paper's train-time random crop), no torchvision."""

from clipforge.transforms.image import (
    OPENAI_MEAN,
    OPENAI_STD,
    ImageTransform,
    image_transform,
    load_image,
    to_pil,
)

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "ImageTransform", "image_transform", "load_image", "to_pil"]
