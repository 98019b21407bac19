"""Every Hugging Face CLIP variant that transformers itself writes loads exactly, or is refused in one sentence.

Tiny random models are built by transformers (CLIPModel, CLIPVisionModelWithProjection,
CLIPTextModelWithProjection), perturbed off their init, saved with save_pretrained, read back
by clipforge and compared with transformers' own outputs to 1e-5 relative error. The configs
cover what the released hub checkpoints vary: layer_norm_eps, head counts that are not width/64,
intermediate sizes that are not a multiple of the width, every supported activation, and both
text pooling rules (eos_token_id 2: argmax of the ids; any other id: its first occurrence).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.checkpoints import api, hf
from clipforge.checkpoints.weights import load_state_dict_into
from clipforge.errors import CheckpointError, InputError
from clipforge.models.config import config_from_dict, preprocess_from_dict
from conftest import CAPTIONS, SHARED_DATA, assert_close, images_for, randomize_

transformers = pytest.importorskip("transformers")

EOS = 49407
API_WIRED = "read_hf_folder" in inspect.getsource(api)
NOT_WIRED = "clipforge.load does not call hf.read_hf_folder yet (api.py's Hugging Face branch is not switched)"


def _tower(width: int, heads: int, act: str, eps: float, **extra) -> dict:
    return {"hidden_size": width, "num_attention_heads": heads, "intermediate_size": 200, "num_hidden_layers": 2,
            "hidden_act": act, "layer_norm_eps": eps, **extra}


def _text(width: int, heads: int, act: str, eps: float, eos: int) -> dict:
    return _tower(width, heads, act, eps, vocab_size=49408, max_position_embeddings=77, eos_token_id=eos)


def _vision(width: int, heads: int, act: str, eps: float) -> dict:
    return _tower(width, heads, act, eps, image_size=32, patch_size=8)


# name -> (text_config, vision_config, weights file)
CLIP_VARIANTS = {
    "quick_gelu-eos49407-eps1e-6": (_text(96, 3, "quick_gelu", 1e-6, EOS), _vision(80, 5, "quick_gelu", 1e-6),
                                    "safetensors"),
    "gelu-eos2-bin": (_text(80, 5, "gelu", 1e-5, 2), _vision(96, 3, "gelu", 1e-6), "bin"),
    "tanh-text-eos269-sharded": (_text(96, 3, "gelu_pytorch_tanh", 1e-6, 269), _vision(80, 5, "gelu", 1e-5), "sharded"),
}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    randomize_(model)
    if hasattr(model, "logit_scale"):
        with torch.no_grad():
            model.logit_scale.fill_(3.1)  # randomize_ leaves it at transformers' init value
    return model.eval()


def _save(model, folder: Path, weights: str = "safetensors") -> Path:
    if weights == "safetensors":
        model.save_pretrained(folder)
    elif weights == "sharded":
        model.save_pretrained(folder, max_shard_size="1MB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:  # transformers 5 writes safetensors even with safe_serialization=False: the older layout by hand
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _read(folder: Path) -> clipforge.CLIP:
    config, state = hf.read_hf_folder(folder, "hf")
    model = clipforge.CLIP(config)
    load_state_dict_into(model, state, str(folder))
    return model.eval()


def _texts() -> torch.Tensor:
    """Captions padded with 0 (OpenAI), the same padded with [EOS] (Hugging Face), and a row without any [EOS]."""
    zero = clipforge.tokenize(CAPTIONS).long()
    eos_padded = zero.clone()
    eos_padded[(eos_padded == 0) & (torch.arange(77) > 0)] = EOS
    no_eos = torch.randint(1, EOS, (1, 77), generator=torch.Generator().manual_seed(3))
    return torch.cat([zero, eos_padded, no_eos])


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 5: a ModelOutput


def _compare_clip(ours, reference) -> None:
    images, text = images_for(32), _texts()
    with torch.no_grad():
        assert_close(ours.encode_image(images), _features(reference.get_image_features(pixel_values=images)))
        assert_close(ours.encode_text(text), _features(reference.get_text_features(input_ids=text)))
        assert_close(ours(images, text)[0], reference(input_ids=text, pixel_values=images).logits_per_image)


def _one_sentence(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message and "missing keys" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# ---------------------------------------------------------------- CLIPModel

@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
def test_clip_model_variant_loads_exactly_and_round_trips(variant, tmp_path):
    text_cfg, vision_cfg, weights = CLIP_VARIANTS[variant]
    config = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=40)
    reference = _perturbed(transformers.CLIPModel(config))
    folder = _save(reference, tmp_path / "hf", weights)
    ours = _read(folder)
    assert ours.config.text.norm_eps == text_cfg["layer_norm_eps"]
    assert ours.config.vision.norm_eps == vision_cfg["layer_norm_eps"]
    eos, text = text_cfg["eos_token_id"], ours.config.text
    assert (text.pool_type, text.eos_id if text.pool_type == "eos" else None) == \
        (("argmax", None) if eos == 2 else ("eos", eos))  # transformers' pooling rule
    for tower in (ours.config.text, ours.config.vision):
        assert int(tower.width * tower.mlp_ratio) == 200
    _compare_clip(ours, reference)
    loaded, transform = clipforge.load(folder)
    assert loaded.config == ours.config and transform is not None
    _compare_clip(loaded, reference)

    written = clipforge.save(ours, tmp_path / "again", format="hf")
    _compare_clip(ours, transformers.CLIPModel.from_pretrained(written).eval())
    assert _read(written).config == ours.config


def test_legacy_config_dict_keys_are_read_as_transformers_reads_them():
    data = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 40,
            "text_config": {"hidden_size": 64, "num_attention_heads": 2, "eos_token_id": 2},
            "text_config_dict": {"hidden_size": 96, "num_attention_heads": 3, "intermediate_size": 200},
            "vision_config_dict": {"hidden_size": 80, "num_attention_heads": 5, "image_size": 64, "patch_size": 16}}
    reference = transformers.CLIPConfig.from_dict(json.loads(json.dumps(data)))
    ours = hf.from_hf_config(data, "legacy")
    t, v = reference.text_config, reference.vision_config
    assert (ours.text.width, ours.text.heads, ours.text.layers, int(ours.text.width * ours.text.mlp_ratio)) == \
        (t.hidden_size, t.num_attention_heads, t.num_hidden_layers, t.intermediate_size)
    assert (ours.text.pool_type, ours.text.eos_id) == ("eos", t.eos_token_id)  # text_config's 2 is overridden
    assert (ours.vision.width, ours.vision.heads, ours.vision.image_size, ours.vision.patch_size, ours.embed_dim) == \
        (v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size, reference.projection_dim)


def test_mlp_ratio_gives_back_every_intermediate_size():
    for width in range(1, 1100, 7):
        for intermediate in (1, 200, 3072, 4 * width, 4 * width + 1, 3 * width - 1, 8191, 13824):
            ratio = hf._mlp_ratio(intermediate, width)
            assert int(width * ratio) == intermediate, (width, intermediate)
    assert hf._mlp_ratio(3072, 768) == 4.0  # the released sizes keep their plain ratio


# ---------------------------------------------------------------- one-tower checkpoints

def test_vision_model_with_projection(tmp_path):
    config = transformers.CLIPVisionConfig(**_vision(80, 5, "gelu_pytorch_tanh", 1e-6), projection_dim=40)
    reference = _perturbed(transformers.CLIPVisionModelWithProjection(config))
    folder = _save(reference, tmp_path / "hf")
    ours = _read(folder)
    assert ours.config.text is None and ours.config.vision.gelu_approximate == "tanh"
    assert not any(k.startswith(("token_embedding", "transformer.", "ln_final")) for k in ours.state_dict())
    assert ours.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images = images_for(32)
    with torch.no_grad():
        assert_close(ours.encode_image(images), reference(pixel_values=images).image_embeds)
    with pytest.raises(InputError, match="no text tower"):
        ours.encode_text(clipforge.tokenize(["a dog"]))

    written = clipforge.save(ours, tmp_path / "again", format="hf")
    again = transformers.CLIPVisionModelWithProjection.from_pretrained(written).eval()
    with torch.no_grad():
        assert_close(ours.encode_image(images), again(pixel_values=images).image_embeds)
    assert _read(written).config == ours.config
    if not API_WIRED:
        pytest.skip(NOT_WIRED)
    loaded, transform = clipforge.load(folder)
    assert loaded.config == ours.config and transform is not None
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), ours.encode_image(images))


def test_text_model_with_projection(tmp_path):
    config = transformers.CLIPTextConfig(**_text(96, 3, "quick_gelu", 1e-5, 2), projection_dim=40)
    reference = _perturbed(transformers.CLIPTextModelWithProjection(config))
    folder = _save(reference, tmp_path / "hf")
    ours = _read(folder)
    assert ours.config.vision is None and ours.visual is None and ours.config.text.pool_type == "argmax"
    text = _texts()
    with torch.no_grad():
        assert_close(ours.encode_text(text), reference(input_ids=text).text_embeds)
    with pytest.raises(InputError, match="no image tower"):
        ours.encode_image(images_for(32))

    written = clipforge.save(ours, tmp_path / "again", format="hf")
    again = transformers.CLIPTextModelWithProjection.from_pretrained(written).eval()
    with torch.no_grad():
        assert_close(ours.encode_text(text), again(input_ids=text).text_embeds)
    assert _read(written).config == ours.config
    if not API_WIRED:
        pytest.skip(NOT_WIRED)
    loaded, transform = clipforge.load(folder)
    assert loaded.config == ours.config and transform is None
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(text), ours.encode_text(text))


# ---------------------------------------------------------------- refusals while loading

@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPTextModel"])
@pytest.mark.parametrize("architectures", [True, False], ids=["named", "legacy-unnamed"])
def test_tower_without_projection_is_refused(kind, architectures, tmp_path):
    if kind == "CLIPVisionModel":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_vision(32, 2, "quick_gelu", 1e-5)))
    else:
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text(32, 2, "quick_gelu", 1e-5, EOS)))
    folder = _save(model, tmp_path / "hf")
    if not architectures:  # old configs name only the model_type; the missing projection weight decides
        data = json.loads((folder / "config.json").read_text())
        data.pop("architectures")
        (folder / "config.json").write_text(json.dumps(data))
    for load in (lambda: hf.read_hf_folder(folder, "hf"), lambda: clipforge.load(folder)):
        with pytest.raises(CheckpointError) as error:
            load()
        _one_sentence(error, kind, "projection", "CLIPVisionModelWithProjection")


def test_other_architecture_is_refused_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SiglipModel"], "model_type": "siglip"}))
    with pytest.raises(CheckpointError) as error:
        hf.read_hf_folder(tmp_path, "hf")
    _one_sentence(error, "SiglipModel", "only CLIPModel")


@pytest.mark.parametrize("acts, names", [
    (("relu", "relu"), ("hidden_act", "'relu'")),
    (("gelu_new", "quick_gelu"), ("hidden_act", "'gelu_new'")),
    (("quick_gelu", "gelu"), ("quick_gelu", "text tower")),
    (("gelu", "quick_gelu"), ("quick_gelu", "vision tower")),
], ids=["unknown", "unknown-text", "mixed-text-quick", "mixed-vision-quick"])
def test_unsupported_activations_are_refused(acts, names, tmp_path):
    config = transformers.CLIPConfig(text_config=_text(32, 2, acts[0], 1e-5, EOS),
                                     vision_config=_vision(32, 2, acts[1], 1e-5), projection_dim=16)
    folder = _save(transformers.CLIPModel(config), tmp_path / "hf")
    with pytest.raises(CheckpointError) as error:
        clipforge.load(folder)
    _one_sentence(error, *names)


def test_unsupported_resample_is_refused():
    with pytest.raises(CheckpointError) as error:
        hf.preprocess_from_hf({"resample": 0, "size": {"shortest_edge": 32}}, 32)
    _one_sentence(error, "resample", "0")


# ---------------------------------------------------------------- refusals while saving

_TINY = {"embed_dim": 16, "quick_gelu": False,
         "vision": {"type": "vit", "image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 8, "vocab_size": 64, "width": 32, "layers": 1, "heads": 2}}
_INEXPRESSIBLE = {
    "ls_init_value": {"vision": {"ls_init_value": 0.1}}, "no_ln_pre": {"vision": {"no_ln_pre": True}},
    "'avg'": {"vision": {"pool_type": "avg"}}, "attentional_pool": {"vision": {"attentional_pool": True}},
    "no_causal_mask": {"text": {"no_causal_mask": True}}, "'first'": {"text": {"pool_type": "first"}},
    "'last'": {"text": {"pool_type": "last"}}, "proj_bias": {"text": {"proj_bias": True}},
    "embed_cls": {"text": {"embed_cls": True}}, "'longest'": {"preprocess": {"resize_mode": "longest"}},
    "ResNet": {"vision": {"type": "resnet", "image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "heads": 4}},
}


@pytest.mark.parametrize("option", list(_INEXPRESSIBLE))
def test_inexpressible_model_is_refused_by_save(option, tmp_path):
    data = json.loads(json.dumps(_TINY))
    for key, value in _INEXPRESSIBLE[option].items():
        replace = key == "preprocess" or "type" in value
        data[key] = value if replace else {**data[key], **value}
    model = clipforge.CLIP(config_from_dict(data))
    with pytest.raises(CheckpointError) as error:
        clipforge.save(model, tmp_path / "hf", format="hf")
    _one_sentence(error, option, "format='clipforge'")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# ---------------------------------------------------------------- preprocessing

PHOTOS = sorted((SHARED_DATA / "flickr8k" / "images").glob("*.jpg"))[:4]


@pytest.mark.parametrize("settings", [
    {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3},
    {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 2,
     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    {"size": {"height": 224, "width": 224}, "do_center_crop": False, "resample": 2},
    {"size": 224, "crop_size": 224, "resample": 3},  # legacy CLIPFeatureExtractor integers
], ids=["bicubic-shortest", "bilinear-shortest-mean0.5", "bilinear-squash", "legacy-ints"])
def test_preprocessing_matches_clip_image_processor(settings, tmp_path):
    if not PHOTOS:
        pytest.skip(f"no Flickr8k photos under {SHARED_DATA}; the shared data folder is absent")
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", **settings}))
    processor_data = json.loads((tmp_path / "preprocessor_config.json").read_text())
    pre = preprocess_from_dict(hf.preprocess_from_hf(processor_data, 224))
    kwargs = {"mean": pre.mean, "std": pre.std, "interpolation": pre.interpolation}
    if "resize_mode" in inspect.signature(clipforge.image_transform).parameters:
        kwargs.update(resize_mode=pre.resize_mode, fill_color=pre.fill_color)
    elif pre.resize_mode != "shortest":
        pytest.skip("clipforge.image_transform has no resize_mode yet")
    transform = clipforge.image_transform(224, **kwargs)
    images = [Image.open(path).convert("RGB") for path in PHOTOS]
    ours = torch.stack([transform(image) for image in images])
    pil = CLIPImageProcessorPil.from_pretrained(tmp_path)(images=images, return_tensors="pt").pixel_values
    assert torch.equal(ours, pil)  # transformers' Pillow pipeline: the same Pillow calls, bit for bit
    default = transformers.CLIPImageProcessor.from_pretrained(tmp_path)(images=images, return_tensors="pt")
    difference = (ours - default.pixel_values).abs()
    # The default (torchvision) pipeline resizes uint8 tensors with its own rounding: measured at most
    # 2 grey levels (0.030 normalised with OpenAI's std), a few pixels per image, mean ~1e-4 to 1e-3.
    assert float(difference.max()) <= 2.5 / 255 / min(pre.std)
    assert float(difference.mean()) < 2e-3


def test_preprocessing_size_that_differs_from_the_model_warns():
    with pytest.warns(UserWarning, match="resizes to 256"):
        hf.preprocess_from_hf({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, 224)
