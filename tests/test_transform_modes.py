"""open_clip's eval resize modes (shortest / longest / squash x bicubic / bilinear): bit-exact against open_clip."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.errors import ConfigError
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD, ImageTransform, image_transform, load_image, preprocess_kwargs
from conftest import SHARED_DATA

FLICKR = SHARED_DATA / "flickr8k" / "images"
CIFAR = SHARED_DATA / "cifar10" / "test"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # CLIPA-style checkpoints
SIZES = [224, 64, 97]
INTERPOLATIONS = ["bicubic", "bilinear"]
# (resize_mode, fill_color): fill only matters where "longest" pads.
MODES = [("shortest", 0), ("squash", 0), ("longest", 0), ("longest", 128), ("longest", 255)]


@pytest.fixture(scope="module")
def oc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("open_clip.transform")


def _ref(oc, size, mode, interp, fill, mean=OPENAI_MEAN, std=OPENAI_STD):
    return oc.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode,
                              interpolation=interp, fill_color=fill)


def _ours(size, mode, interp, fill, mean=OPENAI_MEAN, std=OPENAI_STD):
    return image_transform(size, mean=mean, std=std, interpolation=interp, resize_mode=mode, fill_color=fill)


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert torch.equal(ours, ref), f"{what}: max abs diff {(ours - ref).abs().max().item()}"


# --- real photos -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_images() -> dict[str, Image.Image]:
    """A handful of Flickr8k photos and CIFAR-10 JPEGs, plus non-square crops of photos.

    Both shared sets are stored square (Flickr8k was squashed to 128x128, CIFAR is 32x32), and on a
    square input the three modes nearly coincide, so real non-square content comes from crops.
    """
    if not FLICKR.is_dir() or not CIFAR.is_dir():
        pytest.skip(f"real test images not found under {SHARED_DATA} (the shared data folder is absent)")
    flickr = sorted(FLICKR.glob("*.jpg"))
    images = {f.name: load_image(f) for f in flickr[:: len(flickr) // 6][:6]}
    for i, f in enumerate(sorted(d for d in CIFAR.iterdir() if d.is_dir())[:4]):
        path = sorted(f.glob("*.jpg"))[i]
        images[f"cifar/{f.name}/{path.name}"] = load_image(path)
    photo, other = list(images.values())[:2]
    images["flickr 128x70 crop"] = photo.crop((0, 29, 128, 99))
    images["flickr 45x128 crop"] = other.crop((40, 0, 85, 128))
    images["flickr 97x60 crop"] = photo.crop((10, 10, 107, 70))  # longer side == 97: no resize at 97
    images["flickr 31x20 crop"] = other.crop((50, 50, 81, 70))  # smaller than every target size
    return images


@pytest.mark.parametrize("interp", INTERPOLATIONS)
@pytest.mark.parametrize("mode,fill", MODES)
def test_real_photos_match_open_clip(oc, real_images, mode, fill, interp):
    for size in SIZES:
        ours, ref = _ours(size, mode, interp, fill), _ref(oc, size, mode, interp, fill)
        for name, img in real_images.items():
            _assert_same(ours(img), ref(img), f"{name} {mode}/{interp}/fill={fill} @ {size}")


def test_custom_mean_std_match_open_clip(oc, real_images):
    img = real_images["flickr 128x70 crop"]
    for mode in ("shortest", "longest", "squash"):
        ours = _ours(97, mode, "bilinear", 0, IMAGENET_MEAN, IMAGENET_STD)
        _assert_same(ours(img), _ref(oc, 97, mode, "bilinear", 0, IMAGENET_MEAN, IMAGENET_STD)(img), mode)


# --- awkward files ---------------------------------------------------------------------------------


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_awkward(tmp: Path) -> dict[str, Path]:
    """Every Pillow mode a user is likely to pass, written to disk and reopened through a real decoder."""
    rng = np.random.default_rng(1)
    ramp = np.tile(np.linspace(0, 255, 70).astype(np.uint8), (50, 1))
    images = {
        "L": Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8)),
        "LA": Image.fromarray(np.stack([rng.integers(0, 256, (50, 70), dtype=np.uint8), ramp], -1), "LA"),
        "RGBA": Image.fromarray(np.dstack([_rgb(50, 70), ramp]), "RGBA"),
        "P": Image.fromarray(_rgb(60, 41)).quantize(16),  # index 128/255 beyond the 16 colours
        "P_web": Image.fromarray(_rgb(41, 60)).convert("P"),  # 256-colour web palette
        "1bit": Image.fromarray(rng.integers(0, 2, (37, 53), dtype=np.uint8) * 255).convert("1"),
        "I16": Image.fromarray(rng.integers(0, 65536, (40, 30), dtype=np.uint16)),
        "I16_lowrange": Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint16)),
        "1x1": Image.fromarray(np.array([[[200, 10, 77]]], dtype=np.uint8)),
        "1x300": Image.fromarray(_rgb(300, 1)),  # width x height
        "300x1": Image.fromarray(_rgb(1, 300)),
        "small_13x20": Image.fromarray(_rgb(20, 13)),
        "odd_47x33": Image.fromarray(_rgb(33, 47)),
        "square_64": Image.fromarray(_rgb(64, 64)),  # already the target size at 64: no resize at all
        "rect_64x40": Image.fromarray(_rgb(40, 64)),  # longer side already 64: pad only
        "big_500x375": Image.fromarray(_rgb(375, 500)),  # downscaling, where antialiasing filters differ
    }
    paths = {}
    for name, img in images.items():
        paths[name] = tmp / f"{name}.png"
        img.save(paths[name])
    paths["P_transparent"] = tmp / "P_transparent.png"
    Image.fromarray(_rgb(30, 50)).quantize(32).save(paths["P_transparent"], transparency=3)
    paths["CMYK"] = tmp / "cmyk.jpg"
    Image.fromarray(_rgb(48, 64)).convert("CMYK").save(paths["CMYK"], quality=92)
    paths["F"] = tmp / "float.tif"
    Image.fromarray((rng.random((47, 33)) * 300 - 20).astype(np.float32)).save(paths["F"])
    paths["I"] = tmp / "int32.tif"
    Image.fromarray(rng.integers(-50, 400, (33, 47)).astype(np.int32)).save(paths["I"])
    return paths


EXPECTED_MODE = {"L": "L", "LA": "LA", "RGBA": "RGBA", "P": "P", "P_web": "P", "P_transparent": "P", "1bit": "1",
                 "I16": "I;16", "I16_lowrange": "I;16", "CMYK": "CMYK", "F": "F", "I": "I"}  # fmt: skip


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict[str, Path]:
    paths = _write_awkward(tmp_path_factory.mktemp("awkward"))
    for name, mode in EXPECTED_MODE.items():
        assert load_image(paths[name]).mode == mode, name
    return paths


def _rounds_to_zero(path: Path, size: int) -> bool:
    w, h = Image.open(path).size
    return min(w, h) * size / max(w, h) < 0.5


@pytest.mark.parametrize("interp", INTERPOLATIONS)
@pytest.mark.parametrize("mode,fill", MODES)
def test_awkward_images_match_open_clip(oc, awkward, mode, fill, interp):
    for size in SIZES:
        ours, ref = _ours(size, mode, interp, fill), _ref(oc, size, mode, interp, fill)
        for name, path in awkward.items():
            if mode == "longest" and _rounds_to_zero(path, size):
                continue  # open_clip crashes there; see test_longest_extreme_aspect_does_not_crash
            ref_img = Image.open(path)  # the reference gets its own lazily decoded image, as users pass
            _assert_same(ours(load_image(path)), ref(ref_img), f"{name} {mode}/{interp}/fill={fill} @ {size}")


@pytest.mark.parametrize("name", ["1x300", "300x1"])
def test_longest_extreme_aspect_does_not_crash(oc, awkward, name):
    """Where the short side rounds to 0 px, open_clip raises inside Pillow; we keep 1 px and pad."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    tv = pytest.importorskip("torchvision.transforms")
    img = load_image(awkward[name])
    with pytest.raises(ValueError, match="height and width must be > 0"):
        _ref(oc, 64, "longest", "bilinear", 128)(img)
    resized = tvf.resize(img, [64, 1] if img.height > img.width else [1, 64], tv.InterpolationMode.BILINEAR)
    tail = tv.Compose([oc.CenterCropOrPad(64, fill=128), oc.MaybeConvertMode(), tv.ToTensor(),
                       tv.Normalize(OPENAI_MEAN, OPENAI_STD)])  # fmt: skip
    _assert_same(_ours(64, "longest", "bilinear", 128)(img), tail(resized), name)


def test_padding_colour_depends_on_the_image_mode(awkward):
    """fill_color is a raw band value in the source mode (torchvision pads before the RGB conversion)."""
    corner = {}
    for name in ("RGBA", "CMYK", "P", "1bit"):
        t = image_transform(64, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="longest", fill_color=128)
        corner[name] = [round(v * 255) for v in t(load_image(awkward[name]))[:, 0, 0].tolist()]
    assert corner["RGBA"] == [128, 128, 128]  # (128,) * 4, alpha dropped
    assert corner["CMYK"] == [63, 63, 63]  # CMYK (128, 128, 128, 128) is dark grey
    assert corner["P"] == [0, 0, 0]  # palette index 128 of a 16-colour palette
    assert corner["1bit"] == [255, 255, 255]  # any non-zero fill is white in mode "1"
    palette_image = load_image(awkward["P"])
    t = image_transform(64, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="longest", fill_color=0)
    first_colour = palette_image.getpalette()[:3]
    assert first_colour != [0, 0, 0]  # so fill 0 pads a "P" image with palette colour 0, not black
    assert [round(v * 255) for v in t(palette_image)[:, 0, 0].tolist()] == first_colour


# --- options, errors, object behaviour -------------------------------------------------------------


def test_default_is_unchanged_and_old_positional_calls_work(real_images):
    img = real_images["flickr 128x70 crop"]
    base = image_transform(64)(img)
    assert torch.equal(image_transform(64, False, OPENAI_MEAN, OPENAI_STD, "bicubic", None, 1.0)(img), base)
    assert torch.equal(image_transform(64, resize_mode="shortest", fill_color=255)(img), base)


@pytest.mark.parametrize("mode", ["longest", "squash"])
def test_train_ignores_resize_mode(real_images, mode):
    img = real_images["flickr 128x70 crop"]
    torch.manual_seed(4)
    expected = image_transform(64, train=True)(img)
    torch.manual_seed(4)
    assert torch.equal(image_transform(64, train=True, resize_mode=mode, fill_color=9)(img), expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"resize_mode": "foo"}, "resize_mode must be one of 'shortest', 'longest', 'squash', got 'foo'"),
     ({"resize_mode": None}, "resize_mode must be one of 'shortest', 'longest', 'squash', got None"),
     ({"fill_color": 256}, "fill_color must be an integer in 0..255, got 256"),
     ({"fill_color": -1}, "fill_color must be an integer in 0..255, got -1"),
     ({"fill_color": 1.5}, "fill_color must be an integer in 0..255, got 1.5"),
     ({"fill_color": True}, "fill_color must be an integer in 0..255, got True"),
     ({"interpolation": "cubic"}, "interpolation must be one of 'bicubic', 'bilinear', 'box', 'hamming', "
                                  "'lanczos', 'nearest', got 'cubic'")],
)  # fmt: skip
def test_config_errors_name_field_and_choices(kwargs, message):
    with pytest.raises(ConfigError) as info:
        image_transform(32, **kwargs)
    assert str(info.value) == message
    with pytest.raises(ConfigError):
        ImageTransform(32, **kwargs)


def test_repr_and_pickle(real_images):
    img = real_images["flickr 128x70 crop"]
    longest = image_transform(97, interpolation="bilinear", resize_mode="longest", fill_color=128)
    assert "resize_mode='longest'" in repr(longest) and "CenterCropOrPad(97, fill=128)" in repr(longest)
    assert "bilinear" in repr(longest) and "longer side=97" in repr(longest)
    assert "resize_mode='squash'" in repr(image_transform(64, resize_mode="squash"))
    assert "Resize(64x64" in repr(image_transform(64, resize_mode="squash"))
    assert "resize_mode='shortest'" in repr(image_transform(64)) and "CenterCrop(64)" in repr(image_transform(64))
    assert "(eval only)" in repr(image_transform(64, train=True, resize_mode="squash"))
    clone = pickle.loads(pickle.dumps(longest))
    assert (clone.resize_mode, clone.fill_color) == ("longest", 128)
    assert torch.equal(clone(img), longest(img))


# --- preprocess_kwargs -----------------------------------------------------------------------------


def test_preprocess_kwargs_defaults_and_values():
    default = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest",
               "fill_color": 0}  # fmt: skip
    assert preprocess_kwargs({}) == default
    assert preprocess_kwargs({"mean": None, "interpolation": None, "resize_mode": None, "fill_color": None}) == default
    dfn = {"size": 224, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
           "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0, "unknown": "ignored"}  # fmt: skip
    assert preprocess_kwargs(dfn) == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
                                      "resize_mode": "squash", "fill_color": 0}  # fmt: skip
    assert preprocess_kwargs({"interpolation": "random"})["interpolation"] == "bicubic"
    assert preprocess_kwargs({"mean": 0.5, "std": [2]})["mean"] == (0.5, 0.5, 0.5)
    assert preprocess_kwargs({"mean": 0.5, "std": [2]})["std"] == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    "cfg,field",
    [({"mode": "L"}, "mode"), ({"mean": [0.5, 0.5]}, "mean"), ({"mean": "0.5"}, "mean"),
     ({"std": (1, 0, 1)}, "std"), ({"std": [1, True, 1]}, "std"), ({"interpolation": "nearest"}, "interpolation"),
     ({"resize_mode": "crop"}, "resize_mode"), ({"fill_color": 300}, "fill_color"),
     ({"fill_color": "0"}, "fill_color")],
)  # fmt: skip
def test_preprocess_kwargs_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=rf"^preprocess_cfg\.{field} must "):
        preprocess_kwargs(cfg)
    with pytest.raises(ConfigError, match="preprocess_cfg must be a dict"):
        preprocess_kwargs([("mode", "RGB")])


def test_preprocess_kwargs_shows_allowed_values():
    with pytest.raises(ConfigError) as info:
        preprocess_kwargs({"interpolation": "nearest"})
    expected = "preprocess_cfg.interpolation must be one of 'bicubic', 'bilinear', 'random', got 'nearest'"
    assert str(info.value) == expected


@pytest.mark.parametrize(
    "cfg",
    [{"size": 64, "interpolation": "bilinear", "resize_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3},  # DFN
     {"size": 97, "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 128, "mean": IMAGENET_MEAN,
      "std": IMAGENET_STD},
     {"size": 64, "interpolation": "random", "resize_mode": None, "mode": "RGB"}],
)  # fmt: skip
def test_preprocess_kwargs_end_to_end_with_open_clip(oc, real_images, cfg):
    ref = oc.image_transform_v2(oc.PreprocessCfg(**oc.merge_preprocess_dict(oc.PreprocessCfg(), cfg)), is_train=False)
    ours = image_transform(cfg["size"], **preprocess_kwargs(cfg))
    for name in ("flickr 128x70 crop", "flickr 45x128 crop", "flickr 31x20 crop"):
        img = real_images[name]
        _assert_same(ours(img), ref(img), name)
