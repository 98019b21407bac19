"""The predictive objectives' losses against computations done another way (issue 15)."""

from __future__ import annotations

import math

import pytest

import torch
import torch.nn.functional as F

import clipforge
from clipforge.training.objectives import bag_of_words_target, bow_prediction_loss, caption_lm_loss


def test_bag_of_words_target_by_hand():
    ids = clipforge.tokenize(["a dog and a cat", "dog", ""])
    target = bag_of_words_target(ids, 49408)
    words = [clipforge.tokenizer.get_tokenizer().encode(text) for text in ["a dog and a cat", "dog"]]
    expected = torch.zeros(2, 49408)
    for row, tokens in enumerate(words):
        for token in tokens:
            expected[row, token] += 1 / len(tokens)
    assert torch.allclose(target[:2], expected)
    assert target[0, words[0][0]] == 2 / 5  # "a" twice among five words
    assert target[2].sum() == 0  # the empty caption has no words (not [SOT]/[EOS])


def test_bow_loss_is_the_cross_entropy_against_the_word_distribution():
    torch.manual_seed(0)
    ids = clipforge.tokenize(["a dog and a cat", "two dogs", ""])
    logits = torch.randn(3, 49408)
    loss = bow_prediction_loss(logits, ids)
    tokenizer = clipforge.tokenizer.get_tokenizer()
    by_hand = []
    for row, text in enumerate(["a dog and a cat", "two dogs"]):
        log_z = math.log(sum(math.exp(v) for v in logits[row].double().tolist()))
        tokens = tokenizer.encode(text)
        by_hand.append(-sum(float(logits[row, t]) - log_z for t in tokens) / len(tokens))
    assert abs(float(loss) - sum(by_hand) / 2) < 1e-4  # the wordless caption is left out


def test_caption_lm_loss_is_plain_cross_entropy_over_shifted_tokens():
    torch.manual_seed(0)
    ids = clipforge.tokenize(["a dog runs", "two cats sleep on a mat"])[:, :12]
    logits = torch.randn(2, 12, 49408)
    loss = caption_lm_loss(logits, ids)
    terms = []
    for row in range(2):
        tokens = ids[row].tolist()
        end = tokens.index(max(tokens))  # [EOS]
        for t in range(end):  # logits at t predict token t + 1, through [EOS]
            terms.append(F.cross_entropy(logits[row, t][None], torch.tensor([tokens[t + 1]])))
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    perfect = torch.full_like(logits, -30.0)
    for row in range(2):
        for t in range(11):
            perfect[row, t, ids[row, t + 1]] = 30.0
    assert float(caption_lm_loss(perfect, ids)) < 1e-6


# ---- the heads, the training step and the zero-shot scorers on tiny models ----

from conftest import TINY_VIT, images_for  # noqa: E402

from clipforge.evaluation.predictive_zero_shot import bow_scores, caption_scores  # noqa: E402
from clipforge.models.config import config_from_dict  # noqa: E402
from clipforge.training.objectives import predictive_step  # noqa: E402


def _model(head: str) -> clipforge.CLIP:
    torch.manual_seed(0)
    return clipforge.create_model(config_from_dict({**TINY_VIT, "predictive_head": head}))


def test_micro_batches_give_the_full_batch_gradient():
    for head in ("bow_prediction", "caption_lm"):
        model = _model(head).train()
        images = images_for(model.image_size, count=6)
        texts = clipforge.tokenize(["a dog", "two red cats on a mat", "", "a dog runs", "the sun", "x y z"])
        full = predictive_step(model, images, texts, micro_batch=None)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        parts = predictive_step(model, images, texts, micro_batch=4)
        assert torch.allclose(full["loss"], parts["loss"], atol=1e-6)
        assert grads and all(torch.allclose(p.grad, grads[k], atol=1e-6) for k, p in model.named_parameters()
                             if k in grads)
        logits = model(images, texts, predict=True)
        expected = bow_prediction_loss(logits, texts) if head == "bow_prediction" else caption_lm_loss(logits, texts)
        assert torch.allclose(full["loss"], expected, atol=1e-6)


def test_bow_scorer_picks_the_class_whose_words_the_image_predicts():
    model = _model("bow_prediction").eval()
    classes = ["dog", "cat", "red car"]
    tokenizer = clipforge.tokenizer.get_tokenizer()
    features = torch.eye(3, model.config.embed_dim)  # image k points along axis k
    with torch.no_grad():
        model.bow_head.weight.zero_()
        model.bow_head.bias.zero_()
        for k, name in enumerate(classes):
            for token in tokenizer.encode(name):
                model.bow_head.weight[token, k] = 20.0  # image k predicts class k's words
    scores = bow_scores(model, features, classes, ["a photo of a {}."])
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]
    log_probs = F.log_softmax(model.bow_head(features * model.config.embed_dim ** 0.5), dim=-1)  # by hand
    words = tokenizer.encode("a photo of a cat.")
    assert torch.allclose(scores[0, 1], log_probs[0, words].mean(), atol=1e-5)


def test_caption_scorer_is_the_length_normalised_likelihood_and_finds_the_trained_caption():
    model = _model("caption_lm")
    captions = ["a red square on grass", "two blue circles"]
    images = images_for(model.image_size, count=2)
    texts = clipforge.tokenize(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):  # overfit: each image's own caption becomes its likeliest
        optimizer.zero_grad(set_to_none=True)
        predictive_step(model, images, texts, micro_batch=None)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        features = model.encode_image(images, normalize=True)
    scores = caption_scores(model, features, captions, ["{}"])
    assert scores.argmax(dim=1).tolist() == [0, 1]
    ids = clipforge.tokenize(["two blue circles"])[:, :5]  # by hand, one prompt, one image
    with torch.no_grad():
        log_probs = F.log_softmax(model.caption_logits(features[:1], ids), dim=-1)[0]
    tokens = ids[0].tolist()
    by_hand = sum(float(log_probs[t, tokens[t + 1]]) for t in range(4)) / 4
    assert abs(float(scores[0, 1]) - by_hand) < 1e-4


def test_clipforge_train_runs_each_predictive_objective_and_zero_shot_scores_it(tmp_path):
    import json

    from PIL import Image

    from clipforge.evaluation.datasets import load_classification
    from clipforge.evaluation.zero_shot import evaluate_zero_shot
    from clipforge.training import load_train_config, train

    folder = tmp_path / "colours"
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 60, 230))):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), tuple(max(0, c - 20 * i) for c in rgb)).save(folder / name / f"{i}.png")
    for objective in ("bow_prediction", "caption_lm"):
        out = tmp_path / objective
        config = load_train_config("examples/synthetic.toml", {
            "objective": objective, "output_dir": str(out), "max_steps": "3", "save_every_steps": "3",
            "global_batch_size": "8", "data.num_samples": "24", "data.num_workers": "0",
            "eval": f"zero_shot:imagefolder={folder}", "eval_every_steps": "3"})
        summary = train(config)
        assert summary["steps"] == 3
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("eval/zero_shot_imagefolder_top1" in row for row in logged)
        model = clipforge.load(next((out / "checkpoints").glob("step_*.pt")))[0].eval()
        assert model.config.predictive_head == objective
        dataset = load_classification("imagefolder", folder)
        result = evaluate_zero_shot(model, clipforge.image_transform(model.image_size), dataset,
                                    templates=["a {} shape."], num_workers=0, progress=False)
        assert 0 <= result["top1"] <= 1 and result["num_templates"] == 1
    with pytest.raises(clipforge.ClipforgeError, match="'objective' must be one of contrastive, bow_prediction"):
        load_train_config("examples/synthetic.toml", {"objective": "captioning"})


def test_synthetic_zero_shot_hook_scores_every_objective():
    from clipforge.data.synthetic import single_shape_labels, synthetic_pair
    from clipforge.training.hooks import synthetic_zero_shot

    labelled = single_shape_labels(0, 60)
    assert labelled and all(synthetic_pair(0, i)[1].split(" ", 2)[2].startswith(name) for i, name in labelled)
    for head in (None, "bow_prediction", "caption_lm"):
        torch.manual_seed(0)
        model = clipforge.create_model(config_from_dict({**TINY_VIT, **({"predictive_head": head} if head else {})}))
        values = synthetic_zero_shot(model.eval(), torch.device("cpu"), seed=0, count=60)(model)
        assert set(values) == {"eval/synthetic_zero_shot_top1", "eval/synthetic_zero_shot_colour",
                               "eval/synthetic_zero_shot_shape"}
        assert all(0 <= v <= 1 for v in values.values())


def test_figure2_example_config_and_plot(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys

    from clipforge.training import load_train_config

    for objective in ("contrastive", "bow_prediction", "caption_lm"):
        config = load_train_config("examples/figure2/train.toml", {"objective": objective})
        assert config.objective == objective and config.eval == ["synthetic_zero_shot"]
    spec = importlib.util.spec_from_file_location("figure2_plot", "examples/figure2/plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    assert plot.images_to_reach([(0, 0.0), (100, 0.2), (200, 0.4)], 0.3) == 150
    assert plot.images_to_reach([(0, 0.0), (100, 0.2)], 0.3) is None
    curves = {"contrastive": [0.2, 0.4, 0.5], "bow_prediction": [0.1, 0.3, 0.45], "caption_lm": [0.05, 0.1, 0.2]}
    for objective, values in curves.items():
        for seed in (0, 1):
            folder = tmp_path / "runs" / f"{objective}-seed{seed}"
            folder.mkdir(parents=True)
            rows = [{"step": 10 * (i + 1), plot.METRIC: v} for i, v in enumerate(values)]
            (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(sys, "argv", ["plot.py", str(tmp_path / "runs"), "--out", str(tmp_path / "fig"), "--batch", "10"])
    plot.main()
    table = (tmp_path / "fig.md").read_text()
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    # caption_lm reaches 0.2 at 300 images, bow_prediction at 150 (0.1 + 0.2 * 0.5 of the way): 2.0x
    assert "| Transformer language model vs Bag of words prediction | 20.0% | 300 / 150 | 2.0x | 3x |" in table
