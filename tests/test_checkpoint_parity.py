"""Checkpoints written by the reference packages themselves load into clipforge and compute the same thing.

Each test builds a small random model in a reference implementation (OpenAI's clip package,
open_clip, Hugging Face transformers), saves it in that package's own format, loads it with
clipforge.load, and compares image features, text features and logits to 1e-5 relative error.
"""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.errors import CheckpointError
from clipforge.models.config import config_from_dict
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD
from conftest import CAPTIONS, TINY_RESNET, TINY_VIT, assert_close, images_for, randomize_

ARCHITECTURES = {"vit": TINY_VIT, "resnet": TINY_RESNET}


def _compare(ours: clipforge.CLIP, encode_image, encode_text, logits, size: int) -> None:
    images, text = images_for(size), clipforge.tokenize(CAPTIONS)
    with torch.no_grad():
        assert_close(ours.encode_image(images), encode_image(images))
        assert_close(ours.encode_text(text), encode_text(text))
        assert_close(ours(images, text)[0], logits(images, text))


# ---------------------------------------------------------------- OpenAI's clip package

def _openai_model(arch: str) -> torch.nn.Module:
    clip_model = pytest.importorskip("clip.model")
    cfg = config_from_dict(ARCHITECTURES[arch])
    v, t = cfg.vision, cfg.text
    model = clip_model.CLIP(cfg.embed_dim, v.image_size, tuple(v.layers) if v.is_resnet else v.layers, v.width,
                            v.patch_size, t.context_length, t.vocab_size, t.width, t.heads, t.layers)
    return randomize_(model).eval()


def _openai_archive(reference: torch.nn.Module, path) -> None:
    """An fp16 TorchScript archive laid out like OpenAI's released .pt files."""
    clip_model = pytest.importorskip("clip.model")
    model = clip_model.build_model(reference.state_dict())  # casts weights to fp16, as released
    resolution = reference.visual.input_resolution
    for name, value in (("input_resolution", resolution), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    image = torch.randn(1, 3, resolution, resolution).half()
    text = clipforge.tokenize(["a photo"]).long()
    traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_image": image, "encode_text": text})
    traced.save(str(path))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_openai_fp16_torchscript_archive(arch, tmp_path):
    clip = pytest.importorskip("clip")
    path = tmp_path / "released.pt"
    _openai_archive(_openai_model(arch), path)
    archive_weights = torch.jit.load(str(path)).state_dict()
    assert archive_weights["visual.conv1.weight"].dtype == torch.float16
    reference, _ = clip.load(str(path), device="cpu", jit=False)  # OpenAI's own loader, float32 on CPU
    ours, _ = clipforge.load(path)
    assert ours.config.vision.type == ("resnet" if arch == "resnet" else "vit")
    _compare(ours, reference.encode_image, reference.encode_text, lambda i, t: reference(i, t)[0],
             reference.visual.input_resolution)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_openai_state_dict_file(arch, tmp_path):
    reference = _openai_model(arch)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    # Compared with the float32 model that wrote the file: OpenAI's clip.load would round these
    # weights through fp16 (build_model's convert_weights) before casting back on CPU.
    with pytest.raises(CheckpointError, match="model='openai'") as refused:  # head counts are not in the weights
        clipforge.load(tmp_path / "weights.pt")
    assert "\n" not in str(refused.value)
    ours, _ = clipforge.load(tmp_path / "weights.pt", model="openai")  # OpenAI's build_model rule, stated
    _compare(ours, reference.encode_image, reference.encode_text, lambda i, t: reference(i, t)[0],
             reference.visual.input_resolution)


# ---------------------------------------------------------------- open_clip

def _open_clip_model(arch: str, quick_gelu: bool) -> tuple[torch.nn.Module, dict]:
    open_clip = pytest.importorskip("open_clip")
    cfg = config_from_dict(ARCHITECTURES[arch])
    v, t = cfg.vision, cfg.text
    vision_cfg = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
                  "width": v.width, "head_width": 64}
    if not v.is_resnet:
        vision_cfg["patch_size"] = v.patch_size
    model_cfg = {"embed_dim": cfg.embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg,
                 "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                              "heads": t.heads, "layers": t.layers}}
    model = open_clip.CLIP(**{**model_cfg, "vision_cfg": vision_cfg})
    return randomize_(model).eval(), model_cfg


def _open_clip_compare(ours, reference, size):
    _compare(ours, reference.encode_image, reference.encode_text,
             lambda i, t: reference.logit_scale.exp() * reference.encode_image(i, normalize=True)
             @ reference.encode_text(t, normalize=True).t(), size)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_open_clip_training_checkpoint_with_module_prefix(arch, tmp_path):
    reference, model_cfg = _open_clip_model(arch, quick_gelu=False)
    optimizer = torch.optim.AdamW(reference.parameters())
    checkpoint = {"epoch": 3, "name": "my-run", "optimizer": optimizer.state_dict(),
                  "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "epoch_3.pt")
    ours, _ = clipforge.load(tmp_path / "epoch_3.pt", model=model_cfg)  # the file records no architecture
    _open_clip_compare(ours, reference, ours.image_size)


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_open_clip_hub_folder(arch, weights, tmp_path):
    from safetensors.torch import save_file
    from open_clip.push_to_hf_hub import save_config_for_hf

    reference, model_cfg = _open_clip_model(arch, quick_gelu=False)
    reference.visual.image_mean, reference.visual.image_std = OPENAI_MEAN, OPENAI_STD  # set by open_clip's factory
    state = reference.state_dict()
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / weights))
    else:
        torch.save(state, tmp_path / weights)
    save_config_for_hf(reference, tmp_path / "open_clip_config.json", model_config=model_cfg)
    ours, _ = clipforge.load(tmp_path)
    assert ours.config.quick_gelu is False  # read from the config
    _open_clip_compare(ours, reference, ours.image_size)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_saved_open_clip_folder_loads_in_open_clip(arch, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    ours = randomize_(clipforge.create_model(config_from_dict(ARCHITECTURES[arch]))).eval()
    clipforge.save(ours, tmp_path / "oc", format="open_clip")
    reference, _ = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'oc'}")
    _open_clip_compare(ours, reference.eval(), ours.image_size)


# ---------------------------------------------------------------- Hugging Face transformers

def _hf_features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _hf_compare(ours: clipforge.CLIP, reference) -> None:
    _compare(ours, lambda i: _hf_features(reference.get_image_features(pixel_values=i)),
             lambda t: _hf_features(reference.get_text_features(input_ids=t.long())),
             lambda i, t: reference(input_ids=t.long(), pixel_values=i).logits_per_image, ours.image_size)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_hugging_face_folder(act, safe, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "hidden_act": act},
        vision_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "hidden_act": act},
        projection_dim=48)
    reference = randomize_(transformers.CLIPModel(config)).eval()
    if safe:
        reference.save_pretrained(tmp_path)
    else:  # the older pytorch_model.bin layout that many hub repos still have
        config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    ours, _ = clipforge.load(tmp_path)
    assert ours.config.quick_gelu == (act == "quick_gelu")
    _hf_compare(ours, reference)


def test_saved_hugging_face_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    clipforge.save(ours, tmp_path / "hf", format="hf")
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    _hf_compare(ours, reference)
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")  # tokenizer + image processor
    assert processor.image_processor.crop_size["height"] == ours.image_size
    hf_ids = processor.tokenizer(CAPTIONS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours_ids = clipforge.tokenize(CAPTIONS[:2]).long()
    assert torch.equal(hf_ids[ours_ids != 0], ours_ids[ours_ids != 0])  # HF pads with [EOS], OpenAI with 0


# ---------------------------------------------------------------- clipforge's own round trips

@pytest.mark.parametrize("format", ["clipforge", "open_clip", "hf"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_round_trip_is_exact(arch, format, tmp_path):
    if arch == "resnet" and format == "hf":
        pytest.skip("Hugging Face CLIPModel has no ResNet tower (tested in test_checkpoint_errors)")
    ours = randomize_(clipforge.create_model(config_from_dict(ARCHITECTURES[arch]), quick_gelu=False)).eval()
    written = clipforge.save(ours, tmp_path / "out", format=format)
    again, _ = clipforge.load(written)
    assert again.config == ours.config
    images, text = images_for(ours.image_size), clipforge.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(again(images, text)[0], ours(images, text)[0])
