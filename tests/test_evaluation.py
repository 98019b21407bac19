"""Evaluation: metrics against independent computations, agreement with CLIP_benchmark, the CLI and hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.evaluation.datasets import load_classification, load_retrieval
from clipforge.evaluation.features import image_features, text_features
from clipforge.evaluation.metrics import classification_metrics, retrieval_metrics
from clipforge.evaluation.retrieval import evaluate_retrieval
from clipforge.evaluation.zero_shot import build_zero_shot_classifier, evaluate_zero_shot, read_templates
from clipforge.models import create_model
from clipforge.models.config import config_from_dict
from clipforge.training.hooks import build_eval_hooks

from conftest import TINY_VIT, randomize_

CLASSES = ["red square", "green circle", "blue triangle", "white star", "black cross", "yellow moon"]


def _model() -> clipforge.CLIP:
    return randomize_(create_model(config_from_dict(TINY_VIT, "tiny")), seed=3).eval()


def _image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def image_folder(tmp_path):
    """6 classes x 5 images, as a class-folder tree."""
    root = tmp_path / "folder"
    for c, name in enumerate(CLASSES):
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(5):
            _image(100 * c + i).save(root / name.replace(" ", "_") / f"{i}.png")
    return root


@pytest.fixture
def caption_table(tmp_path):
    """12 test images with 3 captions each (plus train rows that must be ignored), as image/caption/split TSV."""
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    rows = ["image\tcaption\tsplit"]
    for i in range(16):
        _image(1000 + i).save(folder / "images" / f"{i}.jpg", quality=95)
        split = "test" if i < 12 else "train"
        rows += [f"{i}.jpg\t{CLASSES[i % 6]} number {i} version {k}\t{split}" for k in range(3)]
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "captions.tsv"


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 12, generator=generator)
    labels = torch.randint(0, 12, (500,), generator=generator)
    scores[torch.arange(0, 500, 3), labels[::3]] += 2  # better than chance, so the numbers differ by metric
    metrics = classification_metrics(scores, labels, 12)
    assert metrics["top1"] == pytest.approx((scores.argmax(1) == labels).float().mean().item())
    assert metrics["top5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5, labels=range(12)))
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)))
    np.testing.assert_array_equal(metrics["confusion"].numpy(), confusion_matrix(labels, scores.argmax(1)))


def test_retrieval_metrics_match_brute_force_and_clip_benchmark():
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(40, 16, generator=generator), dim=-1)
    owners = torch.tensor([i for i in range(40) for _ in range(1 + i % 3)])  # 1 to 3 captions per image
    texts = F.normalize(images[owners] + 0.9 * torch.randn(len(owners), 16, generator=generator), dim=-1)
    metrics = retrieval_metrics(images, texts, owners, ks=(1, 5, 10), chunk=7)  # chunks cut mid-image
    scores = texts @ images.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owners)), owners] = True
    for k in (1, 5, 10):
        ranked_texts = scores.t().argsort(dim=1, descending=True)[:, :k]  # per image, its k best texts
        brute = np.mean([bool(set(ranked_texts[i].tolist()) & set((owners == i).nonzero().flatten().tolist()))
                         for i in range(40)])
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(brute)
        reference_t2i = (recall_at_k(scores, positive, k) > 0).float().mean().item()
        reference_i2t = (recall_at_k(scores.t(), positive.t(), k) > 0).float().mean().item()
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(reference_t2i)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(reference_i2t)


def test_classifier_is_the_papers_ensemble():
    model = _model()
    templates = ["a photo of a {}.", "a drawing of a {c}."]
    classifier = build_zero_shot_classifier(model, CLASSES[:3], templates)
    for c, name in enumerate(CLASSES[:3]):
        tokens = clipforge.tokenize([f"a photo of a {name}.", f"a drawing of a {name}."], model.context_length)
        with torch.no_grad():
            per_template = F.normalize(model.encode_text(tokens), dim=-1)
        expected = F.normalize(per_template.mean(0), dim=0)
        torch.testing.assert_close(classifier[:, c], expected, rtol=1e-5, atol=1e-6)


class _Loader:
    """What CLIP_benchmark iterates: (pixels, target) batches in dataset order."""

    def __init__(self, dataset, preprocess, batch_size=8, retrieval=False):
        self.items = [(preprocess(dataset[i][0]), dataset[i][1]) for i in range(len(dataset))]
        self.batch_size, self.retrieval = batch_size, retrieval
        self.dataset = dataset  # CLIP_benchmark reads dataloader.dataset.classes
        if not retrieval:
            dataset.classes = dataset.classnames

    def __iter__(self):
        for start in range(0, len(self.items), self.batch_size):
            chunk = self.items[start:start + self.batch_size]
            second = [c[1] for c in chunk] if self.retrieval else torch.tensor([c[1] for c in chunk])
            yield torch.stack([c[0] for c in chunk]), second


def _clip_benchmark_accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` with its one numpy-2 incompatibility fixed (``float()`` of a
    1-element array raises on numpy >= 2.3); the computation is otherwise theirs, unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zero_shot_agrees_with_clip_benchmark(image_folder, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _clip_benchmark_accuracy)
    model = _model()
    preprocess = clipforge.image_transform(model.image_size)
    dataset = load_classification("imagefolder", image_folder)
    templates = ["a photo of a {c}.", "itap of a {c}.", "a low resolution photo of the {c}."]
    ours = evaluate_zero_shot(model, preprocess, dataset, templates=templates, num_workers=0, progress=False)
    tokenizer = lambda texts: clipforge.tokenize(texts, model.context_length)  # noqa: E731
    reference = zeroshot_classification.evaluate(model, _Loader(dataset, preprocess), tokenizer, dataset.classnames,
                                                 templates, "cpu", amp=False)
    assert ours["top1"] == pytest.approx(reference["acc1"])
    assert ours["top5"] == pytest.approx(reference["acc5"])
    assert ours["mean_per_class_recall"] == pytest.approx(reference["mean_per_class_recall"])
    assert 0 < ours["top5"] < 1  # a random model: numbers that could differ if either side were wrong


def test_retrieval_agrees_with_clip_benchmark(caption_table):
    from clip_benchmark.metrics import zeroshot_retrieval

    model = _model()
    preprocess = clipforge.image_transform(model.image_size)
    dataset = load_retrieval("csv", caption_table, "test")
    assert len(dataset) == 12 and all(len(c) == 3 for c in dataset.captions)
    ours = evaluate_retrieval(model, preprocess, dataset, num_workers=0, progress=False)
    tokenizer = lambda texts: clipforge.tokenize(texts, model.context_length)  # noqa: E731
    reference = zeroshot_retrieval.evaluate(model, _Loader(dataset, preprocess, retrieval=True), tokenizer, "cpu",
                                            amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(reference[f"image_retrieval_recall@{k}"])
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(reference[f"text_retrieval_recall@{k}"])
    assert (ours["num_images"], ours["num_captions"]) == (12, 36)


def test_feature_cache_is_reused_only_for_the_same_model(image_folder, tmp_path, monkeypatch):
    model = _model()
    preprocess = clipforge.image_transform(model.image_size)
    dataset = load_classification("imagefolder", image_folder)
    first, index, _ = image_features(model, dataset, preprocess, num_workers=0, cache_dir=tmp_path / "c",
                                     progress=False)
    assert len(list((tmp_path / "c").iterdir())) == 1
    monkeypatch.setattr(type(model), "encode_image", lambda *a, **k: pytest.fail("cache not used"))
    again, index_again, _ = image_features(model, dataset, preprocess, cache_dir=tmp_path / "c", progress=False)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    monkeypatch.undo()
    other = randomize_(_model(), seed=9)
    changed, _, _ = image_features(other, dataset, preprocess, num_workers=0, cache_dir=tmp_path / "c",
                                   progress=False)
    assert len(list((tmp_path / "c").iterdir())) == 2 and not torch.allclose(changed, first)


def test_unreadable_images_are_counted_and_left_out(image_folder):
    model = _model()
    bad = next((image_folder / "green_circle").iterdir())
    bad.write_bytes(b"not an image")
    dataset = load_classification("imagefolder", image_folder)
    result = evaluate_zero_shot(model, clipforge.image_transform(32), dataset, num_workers=0, progress=False)
    assert result["skipped"] == {"unreadable_image": 1} and result["num_samples"] == 29


def test_features_match_direct_encoding(image_folder):
    model = _model()
    preprocess = clipforge.image_transform(model.image_size)
    dataset = load_classification("imagefolder", image_folder)
    features, index, _ = image_features(model, dataset, preprocess, batch_size=7, num_workers=1, progress=False)
    pixels = torch.stack([preprocess(dataset[i][0]) for i in range(len(dataset))])
    with torch.no_grad():
        direct = F.normalize(model.encode_image(pixels), dim=-1)
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-6)
    assert index.tolist() == list(range(len(dataset)))
    texts = text_features(model, ["a", "b c"], batch_size=1)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2))


def test_templates_files(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\nitap of a {c}.\n", encoding="utf-8")
    assert read_templates(tmp_path / "t.txt") == ["a photo of a {}.", "itap of a {}."]
    (tmp_path / "t.json").write_text(json.dumps({"pets": ["a photo of a {c}, a type of pet."]}), encoding="utf-8")
    assert read_templates(tmp_path / "t.json", "pets") == ["a photo of a {}, a type of pet."]
    assert len(read_templates("imagenet")) == 80 and len(read_templates("cifar10")) == 18
    with pytest.raises(clipforge.ClipforgeError, match="has no"):
        (tmp_path / "bad.txt").write_text("no placeholder\n", encoding="utf-8")
        read_templates(tmp_path / "bad.txt")


def test_cli_eval_writes_json_tables_and_summary(image_folder, caption_table, tmp_path, capsys):
    model = _model()
    clipforge.save(model, tmp_path / "model.safetensors")
    out = tmp_path / "results"
    code = main(["eval", "--model", str(tmp_path / "model.safetensors"), "--output", str(out), "--workers", "0",
                 "--zero-shot", f"imagefolder={image_folder},templates=simple", "--confusion", "--no-progress",
                 "--retrieval", f"csv={caption_table}", "--linear-probe", f"imagefolder={image_folder}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "zero_shot on imagefolder" in printed and "text_to_image_R@10" in printed
    zero_shot = json.loads((out / "zero_shot_imagefolder.json").read_text())
    assert zero_shot["metrics"]["num_samples"] == 30 and zero_shot["chance"]["top1"] == pytest.approx(1 / 6)
    retrieval = json.loads((out / "retrieval_csv.json").read_text())
    assert retrieval["chance"]["text_to_image_R@1"] == pytest.approx(1 / 12)
    probe = json.loads((out / "linear_probe_imagefolder.json").read_text())
    assert "halved" in probe["settings"]["protocol"]  # the folder has no train split
    metrics = probe["metrics"]
    assert (metrics["num_train"] + metrics["num_val"], metrics["num_test"]) == (12, 18)  # 2 + 3 of each class
    summary = (out / "summary.md").read_text()
    assert "### zero shot" in summary and "### retrieval" in summary and "### linear probe" in summary
    assert (out / "confusion_imagefolder.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_errors_are_one_sentence(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--zero-shot", "cifar10=/nowhere"]) == 2
    assert main(["eval", "--model", "RN50", "--zero-shot", "cifar10"]) == 2
    assert main(["eval", "--model", "RN50"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("clipforge: error:") for line in errors)
    assert "NAME=PATH" in errors[1] and "nothing to evaluate" in errors[2]


def test_training_hooks_run_zero_shot_and_retrieval(image_folder, caption_table):
    model = _model()
    hooks = build_eval_hooks([f"zero_shot:imagefolder={image_folder},max_samples=12",
                              {"task": "retrieval", "name": "csv", "path": str(caption_table)}],
                             model=model, device=torch.device("cpu"), seed=0)
    values = {k: v for hook in hooks for k, v in hook(model).items()}
    assert set(values) >= {"eval/zero_shot_imagefolder_top1", "eval/retrieval_csv_image_to_text_R@1"}
    preprocess = clipforge.image_transform(model.image_size)
    full = evaluate_retrieval(model, preprocess, load_retrieval("csv", caption_table), num_workers=0, progress=False)
    assert values["eval/retrieval_csv_text_to_image_R@5"] == pytest.approx(full["text_to_image_R@5"])
    with pytest.raises(clipforge.ClipforgeError, match="eval"):
        build_eval_hooks(["zero_shot:cifar10=/nowhere"], model=model, device=torch.device("cpu"), seed=0)
