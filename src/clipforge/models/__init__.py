"""CLIP architectures: configs as data, modules in the style of OpenAI's model.py."""

from clipforge.models.clip import CLIP
from clipforge.models.config import ModelConfig, TextConfig, VisionConfig, config_from_dict, config_from_file
from clipforge.models.factory import available_models, create_model, get_model_config

__all__ = ["CLIP", "ModelConfig", "TextConfig", "VisionConfig", "available_models", "config_from_dict",
           "config_from_file", "create_model", "get_model_config"]
