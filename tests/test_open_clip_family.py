"""open_clip's whole plain-CLIP family loads exactly, from both of open_clip's formats.

For every model config of open_clip that clipforge ships (ViT-H/g/bigG/e with their odd head widths
and MLP ratios, layer scale, CLIPA's avg pooling and bidirectional text, MetaCLIP-2's eos pooling,
ResNets, ...), a shrunk copy — same options, small widths and depths — is built by open_clip
itself, perturbed, saved as a hub folder and as a DDP training checkpoint, loaded with
``clipforge.load`` and compared with open_clip's own outputs. Shape inference is checked against
every shipped config at full size on the meta device.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
import torch

import clipforge
from clipforge.errors import CheckpointError, ClipforgeError
from clipforge.checkpoints.infer import infer_config
from clipforge.models.open_clip_config import model_config_from_open_clip
from conftest import assert_close, randomize_

open_clip = pytest.importorskip("open_clip")
TOLERANCE = 1e-5


def _open_clip_configs() -> dict[str, dict]:
    folder = resources.files("open_clip") / "model_configs"
    return {entry.name[:-5]: json.loads(entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".json")}


OPEN_CLIP_CONFIGS = _open_clip_configs()
SHIPPED = [name for name in sorted(OPEN_CLIP_CONFIGS) if name in clipforge.available_models()]


def test_every_plain_clip_config_of_open_clip_is_shipped():
    plain = [name for name, cfg in OPEN_CLIP_CONFIGS.items()
             if not cfg.get("custom_text") and "multimodal_cfg" not in cfg and "init_logit_bias" not in cfg
             and not cfg.get("vision_cfg", {}).get("timm_model_name") and not cfg.get("text_cfg", {}).get("hf_model_name")]
    assert len(plain) >= 55
    assert sorted(plain) == SHIPPED
    for name in SHIPPED:  # the shipped file is open_clip's config, converted field by field
        assert clipforge.get_model_config(name) == model_config_from_open_clip(OPEN_CLIP_CONFIGS[name], name)


def _shrink(cfg: dict) -> dict:
    """The same architecture options at a size that runs in milliseconds; head widths stay off 64."""
    cfg = copy.deepcopy(cfg)
    cfg["embed_dim"] = 32
    vision = cfg["vision_cfg"]
    if isinstance(vision["layers"], (list, tuple)):
        vision.update(layers=[1, 1, 1, 1], width=16, image_size=64, head_width=32)
    else:
        head_width = vision.get("head_width", 64) // 2 or 8
        patch = vision.get("patch_size", 16)
        vision.update(layers=2, width=2 * head_width, head_width=head_width, image_size=patch * 3)
    text = cfg["text_cfg"]
    text.update(width=48, heads=2, layers=2)
    if text.get("vocab_size", 49408) > 49408:
        text["vocab_size"] = 1000
    return cfg


def _text_ids(cfg: dict, batch: int = 4) -> torch.Tensor:
    text = cfg["text_cfg"]
    context, vocab = text.get("context_length", 77), text.get("vocab_size", 49408)
    if not text.get("hf_tokenizer_name"):
        return clipforge.tokenize(["a dog runs", "", "two children play soccer in a park", "a " * 90],
                                  context_length=context, truncate=True).long()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, context), generator=generator)
    for row, length in enumerate((5, 1, context - 1, context)):
        ids[row, length:] = text.get("pad_id", 0)
        if text.get("pool_type") == "eos":
            ids[row, min(length, context - 1)] = text.get("eos_id", 2)
    return ids


def _reference(cfg: dict) -> torch.nn.Module:
    cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    return randomize_(cls(**kwargs)).eval()


def _compare(ours: clipforge.CLIP, reference: torch.nn.Module, cfg: dict) -> None:
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = _text_ids(cfg)
    with torch.no_grad():
        image_features, text_features = reference.encode_image(images), reference.encode_text(text)
        assert_close(ours.encode_image(images), image_features, TOLERANCE)
        assert_close(ours.encode_text(text), text_features, TOLERANCE)
        logits = reference.logit_scale.exp() * torch.nn.functional.normalize(image_features, dim=-1) \
            @ torch.nn.functional.normalize(text_features, dim=-1).t()
        assert_close(ours(images, text)[0], logits, TOLERANCE)


@pytest.mark.parametrize("name", SHIPPED)
def test_shrunk_model_from_hub_folder_and_training_checkpoint(name, tmp_path):
    cfg = _shrink(OPEN_CLIP_CONFIGS[name])
    reference = _reference(cfg)
    state = reference.state_dict()
    folder = tmp_path / "hub"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    ours, _ = clipforge.load(folder)
    _compare(ours, reference, cfg)

    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match="model=") as refused:  # nothing in the file names the heads
        clipforge.load(tmp_path / "epoch_1.pt")
    assert "\n" not in str(refused.value)
    ours, _ = clipforge.load(tmp_path / "epoch_1.pt", model=cfg)
    _compare(ours, reference, cfg)


def _custom_text_variant(name: str) -> dict:
    cfg = _shrink(OPEN_CLIP_CONFIGS[name])
    cfg["custom_text"] = True
    return cfg


@pytest.mark.parametrize("options", [
    {"embed_cls": True, "pad_id": 0},  # CoCa-style appended class token with open_clip's padding mask
    {"embed_cls": True, "pad_id": 0, "no_causal_mask": True},
    {"proj_bias": True},
    {"proj_type": "none", "width": 32},
    {"pool_type": "first", "ls_init_value": 0.1},
])
def test_custom_text_tower_options(options, tmp_path):
    cfg = _custom_text_variant("ViT-B-32")
    cfg["text_cfg"].update(options)
    reference = _reference(cfg)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    ours, _ = clipforge.load(tmp_path / "weights.pt", model=cfg)
    _compare(ours, reference, cfg)
    written = clipforge.save(ours, tmp_path / "oc", format="open_clip")
    again, _ = open_clip.create_model_from_pretrained(f"local-dir:{written}")
    _compare(ours, again.eval(), cfg)


@pytest.mark.parametrize("options", [
    {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    {"pos_embed_type": "sin_cos_2d"},
    {"pool_type": "avg", "ls_init_value": 0.5},
    {"norm_kwargs": {"eps": 1e-6}},
    {"act_kwargs": {"approximate": "tanh"}},
])
def test_vision_tower_options(options, tmp_path):
    cfg = _shrink(OPEN_CLIP_CONFIGS["ViT-B-16"])
    cfg["vision_cfg"].update(options)
    if "act_kwargs" in options:
        cfg["text_cfg"]["act_kwargs"] = options["act_kwargs"]
    reference = _reference(cfg)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    ours, _ = clipforge.load(tmp_path / "weights.pt", model=cfg)
    _compare(ours, reference, cfg)


def test_sin_cos_positions_equal_open_clips_for_a_new_model():
    cfg = _shrink(OPEN_CLIP_CONFIGS["ViT-B-16"])
    cfg["vision_cfg"]["pos_embed_type"] = "sin_cos_2d"
    reference = open_clip.CLIP(**cfg)
    ours = clipforge.create_model(cfg)
    assert_close(ours.visual.positional_embedding.detach(), reference.visual.positional_embedding.detach(), 1e-6)
    assert not ours.visual.positional_embedding.requires_grad


@pytest.mark.parametrize("option", [{"qk_norm": True}, {"timm_model_name": "vit_base_patch16_224"},
                                    {"scaled_cosine_attn": True}, {"pool_type": "none"}])
def test_models_outside_the_family_are_refused_in_one_sentence(option, tmp_path):
    cfg = _shrink(OPEN_CLIP_CONFIGS["ViT-B-32"])
    cfg["vision_cfg"].update(option)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(ClipforgeError, match=f"vision_cfg.{next(iter(option))}") as error:
        clipforge.load(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shape_inference_never_returns_another_architecture(name):
    config = clipforge.get_model_config(name)
    with torch.device("meta"):
        state = clipforge.create_model(config).state_dict()
    for quick_gelu in (False, True):
        try:
            inferred = infer_config(state, quick_gelu=quick_gelu)
        except CheckpointError as error:
            assert "model=" in str(error)
            continue
        assert inferred == config.replace(quick_gelu=quick_gelu, name=name)
    with pytest.raises(CheckpointError, match="quick_gelu=True"):  # the activation is never guessed
        infer_config(state)


@pytest.mark.parametrize("name, grid", [("ViT-B-16", 5), ("ViT-H-14-CLIPA", 2)])
def test_image_size_resizes_positions_like_open_clip(name, grid, tmp_path):
    cfg = _shrink(OPEN_CLIP_CONFIGS[name])
    reference = _reference(cfg)
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    size = cfg["vision_cfg"]["patch_size"] * grid
    resized = open_clip.create_model(f"local-dir:{folder}", force_image_size=size).eval()
    ours, preprocess = clipforge.load(folder, image_size=size)
    assert ours.image_size == size and preprocess.image_size == size
    _compare(ours, resized, {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": size}})
    with pytest.raises(ClipforgeError, match=f"{size}, {size}"):  # a wrong-size input names the model's size
        ours.encode_image(torch.zeros(1, 3, size + 1, size + 1))


def test_resnet_at_another_resolution(tmp_path):
    cfg = _shrink(OPEN_CLIP_CONFIGS["RN50"])
    reference = _reference(cfg)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    ours, _ = clipforge.load(tmp_path / "w.pt", model=cfg, image_size=96)
    assert ours.visual.attnpool.positional_embedding.shape[0] == 3 * 3 + 1
    with torch.no_grad():
        features = ours.encode_image(torch.randn(2, 3, 96, 96))
    assert features.shape == (2, 32) and torch.isfinite(features).all()


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-M-16-alt", "ViT-L-14-CLIPA", "ViT-H-14-worldwide", "RN50"])
def test_fast_inference_copy_computes_the_same_function(name):
    cfg = _shrink(OPEN_CLIP_CONFIGS[name])
    model = randomize_(clipforge.create_model(cfg)).eval()
    fast = model.for_inference(torch.float32)
    size = cfg["vision_cfg"]["image_size"]
    images, text = torch.randn(2, 3, size, size), _text_ids(cfg)
    with torch.no_grad():
        assert_close(fast.encode_image(images), model.encode_image(images), 1e-4)
        assert_close(fast.encode_text(text), model.encode_text(text), 1e-4)
        assert_close(fast(images, text)[0], model(images, text)[0], 1e-4)
