"""The torch-free core of CLIP's eval preprocessing: decode, resize, crop or pad, then float32 arithmetic.

``ImageTransform`` (torch tensors) and the onnxruntime path (``clipforge.runtime``, numpy arrays)
both run these functions, so the two give the same pixels bit for bit. The geometry uses the same
Pillow calls as torchvision and open_clip (see ``image.py``); the arithmetic is ToTensor + Normalize
in float32, in the same order: ``x / 255``, ``- mean``, ``/ std``.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipforge.errors import ImageError
from clipforge.transforms.resize import center_crop_or_pad, resize_longer_side, resize_square

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "RESAMPLE", "eval_geometry", "load_image", "normalize_array", "to_pil",
           "unit_array"]

#: Per-channel RGB mean and std of OpenAI's training data (from ``clip/clip.py``).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]
_INV = np.float32(255)


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open and fully decode an image, so a corrupt or truncated file fails here, naming the file.

    Pillow decodes lazily; without ``load()`` a truncated JPEG would only fail later inside a
    DataLoader worker with no file name. EXIF orientation is deliberately *not* applied, because
    OpenAI's ``preprocess`` does not apply it either.
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as img:
            img.load()
    except FileNotFoundError:
        raise ImageError(f"cannot read image '{name}': no such file; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"cannot read image '{name}': it is a directory; pass an image file") from None
    except PermissionError as e:
        raise ImageError(f"cannot read image '{name}': {e.strerror}; check the file permissions") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"cannot read image '{name}': not a recognised image format; check the file is a valid image"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"cannot read image '{name}': {e}; raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's decoders raise all of these
        raise ImageError(f"cannot read image '{name}': {e}; check the file is a valid image") from e
    return img


def to_pil(image: ImageInput) -> Image.Image:
    """Accept a PIL image, a path, or a uint8 array (HW, HWC with 1/3/4 channels) and return a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (0-255), got dtype {image.dtype}; convert it first")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise TypeError(f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got shape {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image))
    raise TypeError(f"expected a PIL image, a path or a numpy uint8 array, got {type(image).__name__}")


def resize_shorter_side(img: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so the shorter side is ``size``, with torchvision's rounding of the long side.

    torchvision computes ``int(size * long / short)`` (truncation, float division); other rounding
    choices give a one-pixel-different long side and a shifted center crop.
    """
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"cannot preprocess an empty image of size {w}x{h}")
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):  # torchvision returns the image untouched; PIL would copy it
        return img
    # Pillow itself premultiplies alpha for LA/RGBA and forces NEAREST for "1"/"P", as in the reference.
    return img.resize((new_w, new_h), resample)


def crop(img: Image.Image, top: int, left: int, size: int) -> Image.Image:
    if (left, top, size, size) == (0, 0, *img.size):
        return img
    return img.crop((left, top, left + size, top + size))


def eval_geometry(img: Image.Image, size: int, interpolation: str = "bicubic", resize_mode: str = "shortest",
                  fill_color: int = 0) -> Image.Image:
    """open_clip's eval resize for ``resize_mode`` (shortest + center crop, longest + pad, squash), then RGB.

    The conversion to RGB comes after resizing, as the references do: the resize runs in the source mode.
    """
    resample = RESAMPLE[interpolation]
    if resize_mode == "shortest":
        img = resize_shorter_side(img, size, resample)
        # torchvision's CenterCrop; after a shorter-side resize both sides are >= size, so it never pads
        img = crop(img, int(round((img.height - size) / 2.0)), int(round((img.width - size) / 2.0)), size)
    elif resize_mode == "longest":
        img = center_crop_or_pad(resize_longer_side(img, size, resample), size, fill_color)
    else:  # "squash"
        img = resize_square(img, size, resample)
    return img if img.mode == "RGB" else img.convert("RGB")


def unit_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> CHW float32 in [0, 1]: torchvision's ToTensor (``x / 255`` in float32)."""
    chw = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")
    return np.divide(chw, _INV, out=chw)


def normalize_array(unit: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalize in place, ``(x - mean) / std`` in float32; mean and std are float32 [3, 1, 1] (or [1, 3, 1, 1])."""
    np.subtract(unit, mean, out=unit)
    return np.divide(unit, std, out=unit)


def channel_array(values: Sequence[float], batched: bool = False) -> np.ndarray:
    """mean or std as a float32 array shaped to broadcast over CHW (or NCHW)."""
    shape = (1, 3, 1, 1) if batched else (3, 1, 1)
    return np.asarray([float(v) for v in values], dtype=np.float32).reshape(shape)
