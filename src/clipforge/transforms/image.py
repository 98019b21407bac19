"""Image preprocessing that reproduces OpenAI CLIP's ``preprocess`` bit for bit, without torchvision.

OpenAI's eval transform (``clip.clip._transform``) is torchvision's
``Resize(n, BICUBIC) -> CenterCrop(n) -> convert("RGB") -> ToTensor -> Normalize``. Every step is
re-done here with the same Pillow calls and the same float32 operations in the same order, so the
output tensors are ``torch.equal`` to the reference. torchvision is never imported: it is heavy and
only a thin layer over Pillow for this pipeline. open_clip's other eval modes (``resize_mode``
"longest" and "squash", used by e.g. DFN and CLIPA checkpoints) are matched the same way.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import torch
from PIL import Image

from clipforge.errors import ConfigError
from clipforge.transforms.core import (  # the torch-free core, shared with the onnxruntime path
    OPENAI_MEAN,
    OPENAI_STD,
    ImageInput,
    channel_array,
    eval_geometry,
    load_image,
    normalize_array,
    resize_shorter_side,
    to_pil,
    unit_array,
)
from clipforge.transforms.core import RESAMPLE as _RESAMPLE
from clipforge.transforms.core import crop as _crop
from clipforge.transforms.resize import RESIZE_MODES

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "RESIZE_MODES", "ImageTransform", "image_transform", "load_image",
           "preprocess_kwargs", "to_pil"]

#: What open_clip's ``preprocess_cfg.interpolation`` may say ("random" means bicubic at eval).
_OPEN_CLIP_INTERPOLATIONS = ("bicubic", "bilinear", "random")


def _choices(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values)


class ImageTransform:
    """PIL image / path / uint8 array -> normalised float32 tensor of shape [3, S, S].

    ``train=False`` is open_clip's eval transform for ``resize_mode`` exactly (``torch.equal``):
    "shortest" (OpenAI's ``preprocess``: shorter side to S, center crop), "longest" (longer side to
    S, then center-pad with ``fill_color`` to S x S) or "squash" (both sides to S, aspect ratio lost).
    The image is converted to RGB only after resizing, as the references do.
    ``train=True`` is the CLIP paper's only augmentation: a random square crop of the
    shorter-side-resized image, whatever ``resize_mode`` is (the mode and ``fill_color`` apply to
    eval only). Its crop offsets are drawn exactly like torchvision's ``RandomCrop`` (same RNG calls),
    so the two agree under one seed.
    The object is a plain class so it pickles into DataLoader workers. With ``generator=None`` it uses
    torch's global RNG, which DataLoader seeds differently per worker; a shared ``generator`` would be
    copied into every worker and give each the same crops.
    """

    def __init__(
        self,
        image_size: int,
        train: bool = False,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        interpolation: str = "bicubic",
        generator: torch.Generator | None = None,
        resize_ratio: float = 1.0,
        *,
        resize_mode: str = "shortest",
        fill_color: int = 0,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        if not isinstance(interpolation, str) or interpolation not in _RESAMPLE:
            raise ConfigError(f"interpolation must be one of {_choices(sorted(_RESAMPLE))}, got {interpolation!r}")
        if not isinstance(resize_mode, str) or resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {_choices(RESIZE_MODES)}, got {resize_mode!r}")
        if isinstance(fill_color, bool) or not isinstance(fill_color, int) or not 0 <= fill_color <= 255:
            raise ConfigError(f"fill_color must be an integer in 0..255, got {fill_color!r}")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std must have 3 values (R, G, B), got {len(mean)} and {len(std)}")
        if any(s == 0 for s in std):
            raise ConfigError(f"std must not contain zeros, got {std}")
        if not (isinstance(resize_ratio, (int, float)) and 1.0 <= resize_ratio <= 4.0):
            raise ConfigError(f"resize_ratio must be a number in [1, 4], got {resize_ratio!r}")
        self.image_size = image_size
        self.train = bool(train)
        # Train only: the shorter side is resized to round(ratio * size) before the random crop, so a
        # square source still gets a random crop (ratio 1 crops only along the longer side).
        self.resize_ratio = float(resize_ratio)
        self.mean, self.std = mean, std
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.fill_color = fill_color
        self.generator = generator
        # float32 like torchvision's Normalize, which casts mean/std to the tensor's dtype.
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._mean_array, self._std_array = channel_array(mean), channel_array(std)

    def crop_offsets(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the square crop in a resized image of the given size."""
        s = self.image_size
        if not self.train:
            # torchvision's CenterCrop; it would zero-pad a smaller image, but after a shorter-side
            # resize to s both sides are >= s (int(s * long / short) >= s), so padding never happens.
            return int(round((height - s) / 2.0)), int(round((width - s) / 2.0))
        if height == s and width == s:  # RandomCrop returns early without drawing numbers
            return 0, 0
        top = int(torch.randint(0, height - s + 1, size=(1,), generator=self.generator).item())
        left = int(torch.randint(0, width - s + 1, size=(1,), generator=self.generator).item())
        return top, left

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised CHW float32, same float ops and order as ToTensor + Normalize
        (``transforms.core``, which the onnxruntime path runs too)."""
        return torch.from_numpy(normalize_array(unit_array(img), self._mean_array, self._std_array))

    def __call__(self, image: ImageInput) -> torch.Tensor:
        img = to_pil(image)
        if not self.train:
            return self.to_tensor(eval_geometry(img, self.image_size, self.interpolation, self.resize_mode,
                                                self.fill_color))
        s = self.image_size
        img = resize_shorter_side(img, round(s * self.resize_ratio), _RESAMPLE[self.interpolation])
        top, left = self.crop_offsets(img.height, img.width)
        img = _crop(img, top, left, s)
        if img.mode != "RGB":  # after resize/crop, as the references do: they happen in the source mode
            img = img.convert("RGB")
        return self.to_tensor(img)

    def __repr__(self) -> str:
        s, interp = self.image_size, self.interpolation
        if self.train or self.resize_mode == "shortest":
            crop = "RandomCrop" if self.train else "CenterCrop"
            steps = f"Resize(shorter side={s}, {interp}) -> {crop}({s})"
        elif self.resize_mode == "longest":
            steps = f"Resize(longer side={s}, {interp}) -> CenterCropOrPad({s}, fill={self.fill_color})"
        else:
            steps = f"Resize({s}x{s}, {interp})"
        mode = f"{self.resize_mode!r}{' (eval only)' if self.train else ''}"
        return (
            f"{type(self).__name__}(image_size={s}, train={self.train}, resize_mode={mode}: "
            f"{steps} -> RGB -> Normalize(mean={self.mean}, std={self.std}))"
        )


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    interpolation: str = "bicubic",
    generator: torch.Generator | None = None,
    resize_ratio: float = 1.0,
    *,
    resize_mode: str = "shortest",
    fill_color: int = 0,
) -> ImageTransform:
    """The CLIP preprocessing for ``image_size``: open_clip's eval transform for ``resize_mode``
    (OpenAI's ``preprocess`` by default), or the paper's random crop if ``train``.

    For an open_clip checkpoint, ``image_transform(cfg["size"], **preprocess_kwargs(cfg))``.
    """
    return ImageTransform(image_size, train, mean, std, interpolation, generator, resize_ratio,
                          resize_mode=resize_mode, fill_color=fill_color)


def _channels(value: Any, field: str) -> tuple[float, float, float]:
    """open_clip repeats a scalar mean/std over the 3 channels; a 1-list broadcasts the same way."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if (not isinstance(value, (list, tuple)) or len(value) not in (1, 3)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"preprocess_cfg.{field} must be a number or 3 numbers (R, G, B), got {value!r}")
    floats = tuple(float(v) for v in value)
    return floats * 3 if len(floats) == 1 else floats  # type: ignore[return-value]


def preprocess_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``image_transform`` keyword arguments (all but the size) from an open_clip ``preprocess_cfg`` dict.

    Missing keys and ``None`` values take open_clip's defaults (``PreprocessCfg``); unknown keys are
    ignored, as open_clip ignores them; ``size`` is left to the caller. Interpolation "random" is
    bicubic, which is what open_clip's eval transform uses for it.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"preprocess_cfg must be a dict, got {type(cfg).__name__}")

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key)
        return default if value is None else value

    if get("mode", "RGB") != "RGB":
        raise ConfigError(f"preprocess_cfg.mode must be 'RGB' (the only mode open_clip supports), got {cfg['mode']!r}")
    mean, std = _channels(get("mean", OPENAI_MEAN), "mean"), _channels(get("std", OPENAI_STD), "std")
    if any(s == 0 for s in std):
        raise ConfigError(f"preprocess_cfg.std must not contain zeros, got {std}")
    interpolation = get("interpolation", "bicubic")
    if not isinstance(interpolation, str) or interpolation not in _OPEN_CLIP_INTERPOLATIONS:
        raise ConfigError(f"preprocess_cfg.interpolation must be one of {_choices(_OPEN_CLIP_INTERPOLATIONS)}, "
                          f"got {interpolation!r}")
    resize_mode = get("resize_mode", "shortest")
    if not isinstance(resize_mode, str) or resize_mode not in RESIZE_MODES:
        raise ConfigError(f"preprocess_cfg.resize_mode must be one of {_choices(RESIZE_MODES)}, got {resize_mode!r}")
    fill_color = get("fill_color", 0)
    if isinstance(fill_color, bool) or not isinstance(fill_color, int) or not 0 <= fill_color <= 255:
        raise ConfigError(f"preprocess_cfg.fill_color must be an integer in 0..255, got {fill_color!r}")
    return {"mean": mean, "std": std, "interpolation": "bicubic" if interpolation == "random" else interpolation,
            "resize_mode": resize_mode, "fill_color": fill_color}


# ---------------------------------------------------------------- opt-in fast path (not bit-exact)

def load_image_draft(path: Union[str, os.PathLike], size: int) -> Image.Image:
    """Like ``load_image``, but a JPEG is decoded at 1/2, 1/4 or 1/8 scale when both sides stay >= ``size``.

    libjpeg scales in the DCT domain while decoding (Pillow's ``Image.draft``), so a large photo
    costs a fraction of a full decode, and the resize that follows has fewer pixels to filter.
    Files that are not JPEGs, or too small to reduce, decode exactly as ``load_image`` does.
    """
    try:
        with Image.open(os.fspath(path)) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (size, size))
            img.load()
        return img
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return load_image(path)  # the exact loader reads it, or raises the ImageError naming the problem


class DraftImageTransform(ImageTransform):
    """``ImageTransform`` that decodes JPEG paths at reduced size first (``load_image_draft``): faster, not exact.

    Only paths benefit (a PIL image is already decoded); the rest of the pipeline is unchanged.
    The result differs from OpenAI's ``preprocess`` wherever a reduction applies, by a few
    0-255 levels on average (``python -m clipforge.bench --only decode`` measures it); where no
    reduction applies (the image is smaller than twice ``image_size``) it is bit-identical.
    """

    def __call__(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            image = load_image_draft(image, self.image_size)
        return super().__call__(image)
