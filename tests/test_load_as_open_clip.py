"""What an open_clip user types works: pretrained tags, open_clip's factory functions, each checkpoint's
preprocessing and tokenizer, and the command line — compared with open_clip itself where it can run here."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.checkpoints import api
from clipforge.checkpoints.pretrained import PretrainedWeights
from clipforge.cli.main import main
from clipforge.errors import ClipforgeError, DownloadError, InputError, UnknownModelError
from conftest import CAPTIONS, SHARED_DATA, assert_close, images_for, randomize_
from test_download import _Server

open_clip = pytest.importorskip("open_clip")

TINY_OPEN_CLIP = {"embed_dim": 32, "quick_gelu": False,
                  "vision_cfg": {"image_size": 42, "layers": 2, "width": 80, "head_width": 40, "patch_size": 14,
                                 "mlp_ratio": 4.9231},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}


def _photo() -> Image.Image:
    folder = SHARED_DATA / "flickr8k"
    files = sorted(folder.rglob("*.jpg"))[:1] if folder.is_dir() else []
    if not files:
        pytest.skip(f"no Flickr8k images under {folder}; the shared data folder is absent")
    return Image.open(files[0]).convert("RGB").crop((0, 10, 128, 90))  # non-square, so resize modes differ


def _hub_folder(tmp_path, preprocess_cfg: dict | None = None):
    reference = randomize_(open_clip.CLIP(**TINY_OPEN_CLIP)).eval()
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP,
                                                              "preprocess_cfg": preprocess_cfg or {}}))
    return folder, reference


@pytest.mark.parametrize("preprocess_cfg", [
    {},
    {"resize_mode": "squash", "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},  # DFN
    {"resize_mode": "longest", "fill_color": 128, "interpolation": "bicubic"},
    {"resize_mode": "shortest", "interpolation": "bilinear"},  # CLIPA
])
def test_folder_preprocessing_equals_open_clips(preprocess_cfg, tmp_path):
    folder, _ = _hub_folder(tmp_path, preprocess_cfg)
    _, reference_preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    model, preprocess = clipforge.load(folder)
    photo = _photo()
    assert torch.equal(preprocess(photo), reference_preprocess(photo))
    assert model.config.preprocess.resize_mode == preprocess_cfg.get("resize_mode", "shortest")


def test_open_clip_factory_functions_port_with_one_import(tmp_path):
    folder, reference = _hub_folder(tmp_path, {"resize_mode": "squash", "interpolation": "bilinear"})
    ref_model, _, ref_val = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model, train_transform, val_transform = clipforge.create_model_and_transforms(f"local-dir:{folder}")
    photo = _photo()
    assert torch.equal(val_transform(photo), ref_val(photo))
    assert train_transform(photo).shape == (3, 42, 42)
    images, text = images_for(42), clipforge.tokenize(CAPTIONS)
    with torch.no_grad():
        assert_close(model.encode_image(images), ref_model.eval().encode_image(images))
        assert_close(model.encode_text(text), ref_model.encode_text(text))
    only_model = clipforge.create_model_from_pretrained(f"local-dir:{folder}", return_transform=False)
    assert isinstance(only_model, clipforge.CLIP)
    resized, _, val = clipforge.create_model_and_transforms(f"local-dir:{folder}", force_image_size=56)
    assert resized.image_size == 56 and val(photo).shape == (3, 56, 56)
    random_model, _, _ = clipforge.create_model_and_transforms("ViT-Tiny-32")  # no pretrained: random init
    assert random_model.image_size == 32
    with pytest.raises(ClipforgeError, match="pretrained"):
        clipforge.create_model_from_pretrained("ViT-B-32")
    bf16, _ = clipforge.create_model_from_pretrained(f"local-dir:{folder}", precision="bf16")
    assert bf16.visual.conv1.weight.dtype == torch.bfloat16


def test_pretrained_tag_downloads_and_brings_activation_and_preprocessing(tmp_path, monkeypatch):
    reference = randomize_(clipforge.create_model("ViT-Tiny-32", quick_gelu=True)).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    server = _Server({"/weights/tiny.pt": (tmp_path / "w.pt").read_bytes()})
    try:
        weights = PretrainedWeights(architecture="ViT-Tiny-32", tag="mytag", url=f"{server.url}/weights/tiny.pt",
                                    quick_gelu=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                    interpolation="bilinear", resize_mode="squash")
        monkeypatch.setattr(api, "get_pretrained", lambda arch, tag: weights)
        model, preprocess = clipforge.load("ViT-Tiny-32", pretrained="mytag", cache_dir=tmp_path / "cache")
        assert model.config.quick_gelu is True  # the tag's activation, though ViT-Tiny-32 is GELU
        assert (preprocess.resize_mode, preprocess.interpolation, preprocess.mean) == ("squash", "bilinear",
                                                                                     (0.5, 0.5, 0.5))
        images, text = images_for(32), clipforge.tokenize(CAPTIONS, context_length=32, truncate=True)
        with torch.no_grad():
            assert torch.equal(model(images, text)[0], reference(images, text)[0])
        clipforge.load("ViT-Tiny-32", pretrained="mytag", cache_dir=tmp_path / "cache")
        assert server.requests == 1  # downloaded once
    finally:
        server.close()


def test_pretrained_names_resolve_to_their_source_and_fail_offline_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for call in (lambda: clipforge.load("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=tmp_path),
                 lambda: clipforge.load("ViT-B-32/laion2b_s34b_b79k", cache_dir=tmp_path)):
        with pytest.raises(DownloadError) as error:
            call()
        message = str(error.value)
        assert "laion2b_s34b_b79k" in message and "\n" not in message
        assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message  # open_clip's hub repo for that tag
    with pytest.raises(UnknownModelError, match="laion2b_s34b_b79k"):  # an unknown tag lists the known ones
        clipforge.load("ViT-B-32", pretrained="laion5b_nope", cache_dir=tmp_path)
    with pytest.raises(UnknownModelError, match="no pretrained weights"):
        clipforge.load(tmp_path, pretrained="laion2b_s34b_b79k")


def test_model_aware_tokenizer_makes_openais_snippet_work_for_every_model():
    model = clipforge.create_model("ViT-Tiny-32").eval()  # a 32-token context
    with pytest.raises(InputError, match="context length is 32"):
        model.encode_text(clipforge.tokenize(["a dog"]))  # OpenAI's 77-token ids: one clear sentence
    text = model.tokenize(["a diagram", "a dog", "a cat"])
    assert text.shape == (3, 32)
    with torch.no_grad():
        logits_per_image, _ = model(images_for(32, 1), text)
    assert logits_per_image.softmax(dim=-1).shape == (1, 3)
    ours, reference = clipforge.get_tokenizer("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(ours(CAPTIONS), reference(CAPTIONS))
    assert clipforge.get_tokenizer("ViT-Tiny-32").context_length == 32


def test_list_pretrained_is_data():
    names = clipforge.list_pretrained()
    assert ("ViT-H-14", "laion2b_s32b_b79k", "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K") in names
    assert all(name.architecture in clipforge.available_models() for name in names)
    assert "openai" in clipforge.list_pretrained_tags("ViT-B-32")


def test_convert_command_takes_the_architecture_of_a_state_dict(tmp_path, capsys):
    reference = randomize_(open_clip.CLIP(**TINY_OPEN_CLIP)).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "e.pt")
    (tmp_path / "arch.json").write_text(json.dumps(TINY_OPEN_CLIP))
    assert main(["convert", str(tmp_path / "e.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "model" in capsys.readouterr().err  # refused: the file does not record its heads
    assert main(["convert", str(tmp_path / "e.pt"), str(tmp_path / "hf"), "--to", "hf",
                 "--model-config", str(tmp_path / "arch.json")]) == 0
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = images_for(42)
    with torch.no_grad():
        hf_features = hf_model.get_image_features(pixel_values=images)
        hf_features = hf_features if isinstance(hf_features, torch.Tensor) else hf_features.pooler_output
        assert_close(hf_features, reference.encode_image(images))
    clipa = dict(TINY_OPEN_CLIP, vision_cfg={**TINY_OPEN_CLIP["vision_cfg"], "pool_type": "avg", "no_ln_pre": True})
    (tmp_path / "clipa.json").write_text(json.dumps(clipa))
    torch.save(randomize_(open_clip.CLIP(**clipa)).state_dict(), tmp_path / "clipa.pt")
    assert main(["convert", str(tmp_path / "clipa.pt"), str(tmp_path / "hf2"), "--to", "hf",
                 "--model-config", str(tmp_path / "clipa.json")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may print progress bars first)
    assert error.startswith("clipforge: error:") and "format=" in error  # Hugging Face's CLIPModel cannot express avg pooling
    assert main(["convert", str(tmp_path / "clipa.pt"), str(tmp_path / "oc"), "--to", "open_clip",
                 "--model-config", str(tmp_path / "clipa.json")]) == 0
