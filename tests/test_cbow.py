"""The paper's CBOW text encoder (text.encoder = "cbow"): mean token embedding up to [EOS], projected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, TINY_VIT, images_for, randomize_

import clipforge
from clipforge.errors import ClipforgeError
from clipforge.models.config import config_from_dict

CBOW = {**TINY_VIT, "text": {**TINY_VIT["text"], "encoder": "cbow"}}


def _model() -> clipforge.CLIP:
    torch.manual_seed(0)
    return randomize_(clipforge.create_model(config_from_dict(CBOW))).eval()


def test_features_are_the_mean_embedding_up_to_eos_projected():
    model = _model()
    ids = clipforge.tokenize(CAPTIONS, truncate=True)
    embedding = model.token_embedding.weight.detach().double().numpy()
    projection = model.text_projection.detach().double().numpy()
    expected = []
    for row in ids.tolist():
        end = row.index(max(row)) + 1  # [EOS] has the largest id; the tokens from [SOT] to it
        expected.append(np.mean([embedding[t] for t in row[:end]], axis=0) @ projection)
    with torch.no_grad():
        features = model.encode_text(ids)
    assert np.allclose(features.double().numpy(), np.array(expected), atol=1e-6)
    assert not any(name.startswith(("transformer", "positional_embedding", "ln_final"))
                   for name in model.state_dict())


def test_a_bag_ignores_word_order_and_padding():
    model = _model()
    ids = clipforge.tokenize(["a dog chases a red ball", "a red ball chases a dog"])
    shorter = clipforge.tokenize(["a dog chases a red ball"], context_length=77)[:, :12]
    with torch.no_grad():
        a, b = model.encode_text(ids)
        assert torch.allclose(a, b, atol=1e-6)  # same words, other order
        assert torch.allclose(model.encode_text(shorter)[0], a, atol=1e-6)  # padding is not part of the bag
        fast = model.for_inference(torch.float32).encode_text(ids)
    assert torch.allclose(fast, model.encode_text(ids), atol=1e-6)


def test_saves_and_loads_in_clipforge_format_and_refuses_the_others(tmp_path):
    model = _model()
    path = clipforge.save(model, tmp_path / "cbow.safetensors")
    loaded = clipforge.load(path)[0].eval()
    assert loaded.config.text.encoder == "cbow"
    ids, images = clipforge.tokenize(CAPTIONS, truncate=True), images_for(model.image_size)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    for fmt, peer in (("open_clip", "open_clip"), ("hf", "Hugging Face")):
        with pytest.raises(ClipforgeError, match=f"(?i){peer}.*cbow.*format='clipforge'"):
            clipforge.save(model, tmp_path / fmt, format=fmt)


def test_config_names_the_bad_field():
    with pytest.raises(ClipforgeError, match="text.encoder"):
        config_from_dict({**CBOW, "text": {**CBOW["text"], "encoder": "lstm"}})
    with pytest.raises(ClipforgeError, match="text.encoder.*pool_type"):
        config_from_dict({**CBOW, "text": {**CBOW["text"], "pool_type": "first"}})


def test_trains_contrastively():
    from clipforge.training.grad_cache import contrastive_step
    from clipforge.training.optim import make_optimizer

    model = _model().train()
    optimizer = make_optimizer(model, 1e-3, 0.0, (0.9, 0.98), 1e-6)
    images, ids = images_for(model.image_size, count=8), clipforge.tokenize([f"a photo of {i} dogs" for i in range(8)])
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(contrastive_step(model, images, ids, micro_batch=None)["loss"]))
        optimizer.step()
    assert model.token_embedding.weight.grad is not None and losses[-1] < losses[0]
