"""Reading and writing every public CLIP checkpoint format."""

from clipforge.checkpoints.api import load, released_models, save
from clipforge.checkpoints.download import RELEASED, default_cache_dir, download_verified

__all__ = ["RELEASED", "default_cache_dir", "download_verified", "load", "released_models", "save"]
