"""open_clip's ``longest`` and ``squash`` eval resizes, re-done with the same Pillow calls as torchvision.

open_clip builds them from torchvision (``F.resize`` with an explicit ``[h, w]``, ``F.pad``, ``F.crop``),
which on PIL images is a thin layer over ``Image.resize``, ``ImageOps.expand`` and ``Image.crop``.
Calling those same Pillow functions with the same arguments gives identical pixels in every image mode,
including the fill colour of padded pixels, which depends on the mode (see ``pad_constant``).
"""

from __future__ import annotations

from PIL import Image, ImageOps

from clipforge.errors import ImageError

__all__ = ["RESIZE_MODES", "center_crop_or_pad", "pad_constant", "resize_longer_side", "resize_square"]

#: open_clip's ``PreprocessCfg.resize_mode`` values.
RESIZE_MODES = ("shortest", "longest", "squash")


def _check_not_empty(img: Image.Image) -> None:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"cannot preprocess an empty image of size {img.width}x{img.height}")


def _resize(img: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    if (width, height) == img.size:  # torchvision returns the image untouched; PIL would copy it
        return img
    # Pillow itself premultiplies alpha for LA/RGBA and forces NEAREST for "1"/"P", as in the reference.
    return img.resize((width, height), resample)


def resize_longer_side(img: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so the longer side is ``size``: open_clip's ``ResizeKeepRatio(size, longest=1)``.

    The scale is ``max(h, w) / size`` and each side is ``round(side / scale)`` (Python's round-half-even),
    exactly as open_clip computes it. Where a side would round to 0 (aspect ratio beyond ~2 * size:1),
    open_clip crashes inside Pillow ("height and width must be > 0"); here that side becomes 1 pixel
    and the rest is padded, the only result consistent with the mode.
    """
    _check_not_empty(img)
    w, h = img.size
    scale = max(h / size, w / size)  # open_clip: max * longest + min * (1 - longest), == max for longest=1
    return _resize(img, max(1, round(w / scale)), max(1, round(h / scale)), resample)


def resize_square(img: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize both sides to ``size``, ignoring the aspect ratio: torchvision's ``Resize((size, size))``."""
    _check_not_empty(img)
    return _resize(img, size, size, resample)


def pad_constant(img: Image.Image, ltrb: tuple[int, int, int, int], fill: int) -> Image.Image:
    """Pad with a constant like torchvision's ``F.pad`` on a PIL image (``ImageOps.expand``).

    The fill is given per band (``(fill,) * bands``), so it is a raw band value in the image's own mode,
    not a grey level: an RGBA pad is ``(f, f, f, f)``, a CMYK pad converts to a much darker RGB, a "1"
    pad is white for any non-zero fill, and a "P" pad is palette index ``fill``, whose colour is
    whatever the palette holds there (so fill 0 is usually not black). torchvision re-attaches the
    source palette to "P" results (not to "PA"); that is repeated here, although with Pillow 13
    ``ImageOps.expand`` already keeps the palette and it changes nothing.
    """
    bands = len(img.getbands())
    color: int | tuple[int, ...] = fill if bands == 1 else (fill,) * bands
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=ltrb, fill=color)
        out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=ltrb, fill=color)


def center_crop_or_pad(img: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """Center-crop to ``size`` x ``size``, padding first with ``fill`` where the image is smaller.

    open_clip's ``center_crop_or_pad``: the extra pixel of an odd padding goes right/bottom, the crop
    offset is ``round((side - size) / 2)``; with ``fill=0`` this is also torchvision's ``CenterCrop``.
    """
    w, h = img.size
    if size > w or size > h:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        img = pad_constant(img, (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill)
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    if (left, top, size, size) == (0, 0, w, h):
        return img
    return img.crop((left, top, left + size, top + size))
