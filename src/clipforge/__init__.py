"""clipforge: CLIP (Radford et al., 2021) as real software.

Ports from OpenAI's package by changing one import::

    import clipforge as clip
    model, preprocess = clip.load("ViT-B-32")
    text = clip.tokenize(["a dog", "a cat"])
"""

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

__version__ = "0.1.0"
__all__ = ["CLIP", "ClipforgeError", "ModelConfig", "available_models", "create_model", "create_model_and_transforms",
           "create_model_from_pretrained", "decode", "get_model_config", "get_tokenizer", "image_transform",
           "list_pretrained", "list_pretrained_tags", "load", "load_image", "released_models", "save", "tokenize"]
