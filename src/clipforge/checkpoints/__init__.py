"""Reading and writing every public CLIP checkpoint format."""

from clipforge.checkpoints.api import load, model_transform, released_models, save
from clipforge.checkpoints.download import RELEASED, default_cache_dir, download_verified
from clipforge.checkpoints.open_clip_api import create_model_and_transforms, create_model_from_pretrained
from clipforge.checkpoints.pretrained import get_pretrained, list_pretrained, list_pretrained_tags

__all__ = ["RELEASED", "create_model_and_transforms", "create_model_from_pretrained", "default_cache_dir",
           "download_verified", "get_pretrained", "list_pretrained", "list_pretrained_tags", "load",
           "model_transform", "released_models", "save"]
