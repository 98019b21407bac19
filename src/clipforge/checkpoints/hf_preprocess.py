"""Hugging Face's ``preprocessor_config.json`` (CLIPImageProcessor) -> clipforge's preprocessing, fields checked."""

from __future__ import annotations

import math
import warnings
from typing import Any

from clipforge.checkpoints.files import boolean, field_error, optional_object, positive_int, positive_number, short
from clipforge.errors import CheckpointError
from clipforge.models.config import OPENAI_MEAN, OPENAI_STD

RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values CLIPImageProcessor stores


def _edge(value: Any, field: str, source: str) -> dict[str, Any]:
    """A size setting as a dict of positive ints (legacy configs store one int)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"shortest_edge": value} if field == "size" else {"height": value, "width": value}
    edges = optional_object(value, field, source)
    for key, side in edges.items():
        positive_int(side, f"{field}.{key}", source)
    return edges


def _channels(processor: dict[str, Any], field: str, default: tuple, source: str) -> list[float]:
    value = processor.get(field, list(default))
    value = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(value, list) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise field_error(source, field, processor.get(field), "3 numbers (R, G, B)")
    return value


def preprocess_from_hf(processor: dict[str, Any], image_size: int, source: str = "preprocessor_config.json"
                       ) -> dict[str, Any]:
    """PreprocessConfig fields for a CLIPImageProcessor config; the transform always makes image_size images."""
    for flag in ("do_resize", "do_rescale", "do_center_crop", "do_normalize"):
        if flag in processor:
            boolean(processor[flag], flag, source)
    resample = processor.get("resample", 3)
    if isinstance(resample, bool) or not isinstance(resample, int) or resample not in RESAMPLE:
        raise CheckpointError(f"{source} sets resample to {short(resample)}; clipforge resizes with bilinear (2) or "
                              "bicubic (3) only")
    rescale = positive_number(processor.get("rescale_factor", 1 / 255), "rescale_factor", source)
    if not processor.get("do_resize", True) or not processor.get("do_rescale", True) or \
            abs(rescale * 255 - 1) > 1e-9:
        raise CheckpointError(f"{source} turns off resizing or rescales pixels by {rescale} instead of 1/255; "
                              "clipforge's transform cannot reproduce it")
    size, crop = _edge(processor.get("size", 224), "size", source), _edge(processor.get("crop_size", 224),
                                                                          "crop_size", source)
    crop_side = crop.get("height") if crop.get("height") == crop.get("width") else short(crop)
    center_crop = processor.get("do_center_crop", True)
    if set(size) == {"shortest_edge"}:
        mode, resized = "shortest", size["shortest_edge"]
    elif set(size) == {"height", "width"} and size["height"] == size["width"]:
        mode, resized = "squash", size["height"]
        crop_side = crop_side if center_crop else resized
    else:
        raise CheckpointError(f"{source} sets size to {short(size)}; clipforge supports {{'shortest_edge': N}} and "
                              "square {'height': N, 'width': N} only")
    if resized != image_size or crop_side != image_size or (mode == "shortest" and not center_crop):
        warnings.warn(f"{source} resizes to {resized} and crops to {crop_side if center_crop else 'nothing'}, but "
                      f"the model takes {image_size}x{image_size} images; clipforge's transform resizes and crops "
                      f"to {image_size}", stacklevel=3)
    if not processor.get("do_normalize", True):
        return {"interpolation": RESAMPLE[resample], "resize_mode": mode, "mean": [0.0] * 3, "std": [1.0] * 3}
    return {"interpolation": RESAMPLE[resample], "resize_mode": mode,
            "mean": _channels(processor, "image_mean", OPENAI_MEAN, source),
            "std": _channels(processor, "image_std", OPENAI_STD, source)}
