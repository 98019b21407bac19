"""Architectures: key names, shapes and parameter counts equal OpenAI's; configs validated; forward semantics."""

from __future__ import annotations

import json
import math

import pytest
import torch

import clipforge
from clipforge.errors import ConfigError, UnknownModelError
from clipforge.models.config import config_from_dict
from conftest import TINY_RESNET, TINY_VIT, assert_close, images_for, randomize_

# Exact totals (including logit_scale, excluding BatchNorm statistics), from OpenAI's releases.
RELEASED_PARAMETER_COUNTS = {
    "RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
    "RN50x64": 623_258_305, "ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}


def _openai_reference(config: clipforge.ModelConfig) -> torch.nn.Module:
    clip_model = pytest.importorskip("clip.model")
    vision, text = config.vision, config.text
    return clip_model.CLIP(config.embed_dim, vision.image_size, vision.layers if not vision.is_resnet else tuple(vision.layers),
                           vision.width, vision.patch_size, text.context_length, text.vocab_size, text.width,
                           text.heads, text.layers)


@pytest.mark.parametrize("name", list(RELEASED_PARAMETER_COUNTS))
def test_released_architecture_matches_openai_keys_shapes_and_count(name):
    with torch.device("meta"):
        ours = clipforge.create_model(name)
        reference = _openai_reference(ours.config)
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert our_shapes == reference_shapes
    assert sum(p.numel() for p in ours.parameters()) == RELEASED_PARAMETER_COUNTS[name]


def test_available_models_lists_the_nine_and_small_cpu_configs():
    names = clipforge.available_models()
    assert set(RELEASED_PARAMETER_COUNTS) <= set(names)
    small = [clipforge.get_model_config(n) for n in names if n not in RELEASED_PARAMETER_COUNTS]
    assert any(c.vision.type == "vit" and c.vision.image_size <= 64 for c in small)
    assert any(c.vision.type == "resnet" and c.vision.image_size <= 64 for c in small)


def test_openai_spellings_name_openais_quickgelu_models():
    assert clipforge.get_model_config("ViT-L/14@336px") == clipforge.get_model_config("ViT-L-14-336-quickgelu")
    assert clipforge.get_model_config("ViT-B/32").quick_gelu
    assert not clipforge.get_model_config("ViT-B-32").quick_gelu  # open_clip's name: GELU


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError) as error:
        clipforge.create_model("ViT-B-33")
    assert "ViT-B-32" in str(error.value) and "clipforge models" in str(error.value)
    assert len(str(error.value)) < 300  # one sentence, not the list of 58 names


def test_user_config_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(TINY_VIT))
    model = clipforge.create_model(path)
    assert model.config.vision.width == 128 and model.config.name == "mine"


@pytest.mark.parametrize("change, field", [
    ({"embed_dim": 0}, "embed_dim"),
    ({"vision": {**TINY_VIT["vision"], "patch_size": 7}}, "vision.image_size"),
    ({"vision": {**TINY_VIT["vision"], "heads": 3}}, "vision.heads"),
    ({"vision": {**TINY_VIT["vision"], "type": "convnext"}}, "vision.type"),
    ({"vision": {**TINY_RESNET["vision"], "layers": [1, 1, 1]}}, "vision.layers"),
    ({"text": {**TINY_VIT["text"], "widht": 64}}, "text.widht"),
    ({"quick_gelu": "yes"}, "quick_gelu"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        config_from_dict({**TINY_VIT, **change})


def test_openai_initialisation():
    model = clipforge.create_model(config_from_dict(TINY_RESNET))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert all(float(block.bn3.weight.detach().abs().sum()) == 0 for block in model.visual.layer1)
    width, layers = model.transformer.width, model.transformer.layers
    std = float(model.transformer.resblocks[0].mlp.c_proj.weight.std())
    assert std == pytest.approx(width ** -0.5 * (2 * layers) ** -0.5, rel=0.1)


def test_logits_are_scaled_cosines_clipped_at_100():
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    text = clipforge.tokenize(["a dog", "a cat"])
    image = images_for(32, 2)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        logits_per_image, logits_per_text = model(image, text)
        cosine = torch.nn.functional.cosine_similarity(
            model.encode_image(image)[:, None], model.encode_text(text)[None], dim=-1)
    assert_close(logits_per_image, 100.0 * cosine)
    assert torch.equal(logits_per_text, logits_per_image.t())


def test_padding_after_eos_never_changes_text_features():
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    short = clipforge.tokenize(["a dog on grass", "hi"], context_length=77)
    noisy = short.clone()
    noisy[noisy == 0] = 1234  # garbage after [EOS] must be ignored by causal attention
    noisy[:, -1] = 5
    with torch.no_grad():
        assert_close(model.encode_text(noisy), model.encode_text(short))


def test_quick_gelu_is_configurable():
    gelu = clipforge.create_model(config_from_dict(TINY_VIT), quick_gelu=False)
    assert isinstance(gelu.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    quick = clipforge.create_model(config_from_dict(TINY_VIT))
    assert type(quick.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    model = randomize_(clipforge.create_model(config_from_dict(config))).eval()
    image, text = images_for(model.image_size, 2), clipforge.tokenize(["a dog", "a cat"])

    def gradients():
        model.zero_grad()
        logits, _ = model(image, text)
        logits.logsumexp(dim=1).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = gradients()
    model.set_grad_checkpointing(True)
    assert_close(gradients(), plain)


def test_too_long_text_for_context_is_a_clear_error():
    model = clipforge.create_model("ViT-Tiny-32")
    with pytest.raises(ValueError, match="context length is 32"):
        model.encode_text(clipforge.tokenize(["a dog"]))
