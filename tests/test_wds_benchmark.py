"""CLIP_benchmark WebDataset copies: the reader, and metrics equal to CLIP_benchmark's own run through open_clip."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.errors import ClipforgeError
from clipforge.evaluation import report
from clipforge.evaluation.features import image_features
from clipforge.evaluation.multilabel import average_precision_per_class
from clipforge.evaluation.runner import EvalSpec, run_eval
from clipforge.evaluation.wds_benchmark import load_wds
from clipforge.evaluation.zero_shot import build_zero_shot_classifier
from conftest import randomize_

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("webdataset")

TINY_OPEN_CLIP = {"embed_dim": 32, "quick_gelu": False,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}
CLASSES = ["red square", "green circle", "blue triangle", "white star", "black cross", "yellow moon"]
TEMPLATES = ["a photo of a {c}.", "itap of a {c}.", "a low resolution photo of the {c}."]
FORMATS = ("webp", "png", "jpg")


def _image_bytes(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    options = {"webp": dict(format="webp", lossless=True), "png": dict(format="png"),
               "jpg": dict(format="jpeg", quality=95)}[fmt]
    Image.fromarray(pixels).save(buffer, **options)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, samples: list[tuple[bytes, str, bytes]], *, label_ext: str, dataset_type: str | None = None,
              classnames: list[str] | None = None, per_shard: int = 7, split: str = "test") -> Path:
    """CLIP_benchmark's layout: root text files, then <split>/nshards.txt and 0.tar, 1.tar, ... of s%07d samples."""
    (root / split).mkdir(parents=True)
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n", encoding="utf-8")
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for number, chunk in enumerate(shards):
        with tarfile.open(root / split / f"{number}.tar", "w") as tar:
            for offset, (image, ext, label) in enumerate(chunk):
                key = f"s{number * per_shard + offset:07d}"
                _add(tar, f"{key}.{ext}", image)
                _add(tar, f"{key}.{label_ext}", label)
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n", encoding="utf-8")
    return root


@pytest.fixture
def classification(tmp_path) -> Path:
    """6 classes x 3 images, webp/png/jpg mixed, over 3 shards."""
    samples = [(_image_bytes(10 * c + i, FORMATS[(c + i) % 3]), FORMATS[(c + i) % 3], str(c).encode())
               for i in range(3) for c in range(len(CLASSES))]
    return write_wds(tmp_path / "wds_shapes", samples, label_ext="cls", classnames=CLASSES)


@pytest.fixture
def multilabel(tmp_path) -> Path:
    """14 images with 0/1 vectors over 5 classes (one class has no positive: AP 0, still averaged)."""
    rng = np.random.default_rng(5)
    samples = []
    for i in range(14):
        vector = (rng.random(5) < 0.4).astype(np.int64)
        vector[4] = 0
        buffer = io.BytesIO()
        np.save(buffer, vector)
        samples.append((_image_bytes(200 + i, FORMATS[i % 3]), FORMATS[i % 3], buffer.getvalue()))
    return write_wds(tmp_path / "wds_voc", samples, label_ext="npy", dataset_type="multilabel",
                     classnames=CLASSES[:5])


@pytest.fixture
def retrieval(tmp_path) -> Path:
    """10 images with 2 captions each."""
    samples = [(_image_bytes(300 + i, FORMATS[i % 3]), FORMATS[i % 3],
                f"{CLASSES[i % 6]} number {i}\na picture of {CLASSES[(i + 1) % 6]} {i}".encode()) for i in range(10)]
    return write_wds(tmp_path / "wds_pairs", samples, label_ext="txt", dataset_type="retrieval", per_shard=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An open_clip model (CLIP_benchmark's side) and the same weights loaded by clipforge."""
    folder = tmp_path_factory.mktemp("hub")
    reference = randomize_(open_clip.CLIP(**TINY_OPEN_CLIP), seed=4).eval()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    _, reference_preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    model, preprocess = clipforge.load(folder)
    return folder, reference, reference_preprocess, model.eval(), preprocess


def _clip_benchmark_accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` with its numpy >= 2.3 ``float()`` of an array fixed; otherwise theirs."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _build_wds_dataset():
    """clip_benchmark's ``build_wds_dataset``, its source unchanged, taken from builder.py without importing that
    module (which needs requests and torchvision for its other datasets)."""
    import ast
    import os

    import clip_benchmark

    source = (Path(clip_benchmark.__file__).parent / "datasets" / "builder.py").read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "build_wds_dataset")
    namespace = {"os": os}
    exec(compile(ast.Module([node], []), "builder.py", "exec"), namespace)  # noqa: S102 (installed package code)
    return namespace["build_wds_dataset"]


def _reference_loader(root: Path, preprocess):
    """What ``clip_benchmark eval --dataset wds/...`` builds: its own WebDataset reader, batched."""
    dataset = _build_wds_dataset()("wds/x", preprocess, split="test", data_dir=str(root))
    return dataset, torch.utils.data.DataLoader(dataset.batched(5), batch_size=None, shuffle=False, num_workers=0)


def _ours(spec: str, task: str, model, preprocess) -> dict:
    return run_eval(EvalSpec.parse(task, spec), model, preprocess, model_name="tiny", num_workers=0,
                    progress=False)["metrics"]


def test_zero_shot_equals_clip_benchmark(classification, models, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _clip_benchmark_accuracy)
    _, reference, reference_preprocess, model, preprocess = models
    dataset, loader = _reference_loader(classification, reference_preprocess)
    expected = zeroshot_classification.evaluate(reference, loader, open_clip.tokenize, dataset.classes,
                                                dataset.templates, "cpu", amp=False)
    ours = _ours(f"wds/shapes={classification}", "zero_shot", model, preprocess)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key
    assert (ours["top1"], ours["top5"]) == (ours["acc1"], ours["acc5"])
    assert ours["num_samples"] == 18 and ours["num_templates"] == 3 and 0 < ours["acc5"] < 1
    # A random model scores near chance, so also compare the logits themselves, image by image in reading order.
    classifier = zeroshot_classification.zero_shot_classifier(reference, open_clip.tokenize, dataset.classes,
                                                              dataset.templates, "cpu", amp=False)
    their_logits, their_labels = zeroshot_classification.run_classification(reference, classifier, loader, "cpu",
                                                                            amp=False)
    _, data = load_wds("wds/shapes", classification)
    features, _, _ = image_features(model, data, preprocess, num_workers=0, progress=False)
    our_classifier = build_zero_shot_classifier(model, CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES])
    assert their_labels.tolist() == data.labels
    torch.testing.assert_close(100 * features @ our_classifier, their_logits, rtol=1e-4, atol=1e-4)


def test_multilabel_map_equals_clip_benchmark(multilabel, models):
    from clip_benchmark.metrics import zeroshot_classification

    _, reference, reference_preprocess, model, preprocess = models
    dataset, loader = _reference_loader(multilabel, reference_preprocess)
    expected = zeroshot_classification.evaluate(reference, loader, open_clip.tokenize, dataset.classes,
                                                dataset.templates, "cpu", amp=False)
    ours = _ours(f"wds/voc={multilabel}", "zero_shot", model, preprocess)
    assert ours["mean_average_precision"] == pytest.approx(expected["mean_average_precision"], abs=1e-6)
    assert ours["average_precision_per_class"][4] == 0 and ours["num_samples"] == 14
    result = report.make_result("zero_shot", "wds_voc", "tiny", ours, seconds=0)
    assert result["chance"] == {} and "mean_average_precision" in report.format_table(result)
    assert "| mean_average_precision |" in report.markdown_summary([result])


def test_average_precision_matches_clip_benchmark_on_random_scores():
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class as theirs

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=generator)
    targets = (torch.rand(50, 7, generator=generator) < 0.3).long()
    targets[:, 6] = 0
    torch.testing.assert_close(average_precision_per_class(scores, targets), theirs(scores, targets))


def test_retrieval_equals_clip_benchmark(retrieval, models):
    from clip_benchmark.metrics import zeroshot_retrieval

    _, reference, reference_preprocess, model, preprocess = models
    _, loader = _reference_loader(retrieval, reference_preprocess)
    expected = zeroshot_retrieval.evaluate(reference, loader, open_clip.tokenize, "cpu", amp=False,
                                           recall_k_list=[1, 5, 10])
    ours = _ours(f"wds/pairs={retrieval}", "retrieval", model, preprocess)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["image_retrieval_recall@1"] == ours["text_to_image_R@1"]
    assert (ours["num_images"], ours["num_captions"]) == (10, 20)


def test_reader_order_labels_and_formats(classification):
    info, dataset = load_wds("wds/shapes", classification)
    assert info.dataset_type == "classification" and info.classnames == CLASSES and len(info.templates) == 3
    assert dataset.labels == [c for _ in range(3) for c in range(6)]  # shard by shard, key by key
    expected = np.asarray(Image.open(io.BytesIO(_image_bytes(10 * 1 + 0, "png"))).convert("RGB"))
    assert np.array_equal(np.asarray(dataset[1][0]), expected)  # s0000001: class 1, png, lossless
    small = load_wds("wds/shapes", classification, max_samples=6)[1]
    assert sorted(small.labels) == list(range(6))


def test_cli_eval_from_hf_hub_uses_snapshot_download(classification, models, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(classification)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = models[0]
    out = tmp_path / "results"
    assert main(["eval", "--model", str(folder), "--output", str(out), "--workers", "0", "--no-progress",
                 "--zero-shot", "wds/shapes=hf-hub:clip-benchmark/wds_shapes"]) == 0
    assert calls[0][0] == "clip-benchmark/wds_shapes" and calls[0][1]["repo_type"] == "dataset"
    hub = json.loads((out / "zero_shot_wds_shapes.json").read_text())["metrics"]
    local = _ours(f"wds/shapes={classification}", "zero_shot", models[3], models[4])
    assert hub["acc1"] == local["acc1"] and hub["mean_per_class_recall"] == local["mean_per_class_recall"]
    assert "zero_shot on wds_shapes" in capsys.readouterr().out


def test_offline_hub_root_is_one_sentence(models, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["eval", "--model", str(models[0]), "--zero-shot", "wds/cifar10=hf-hub:clip-benchmark/wds_cifar10",
                 "--no-progress", "--workers", "0", "--feature-cache", "none"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "clip-benchmark/wds_cifar10" in error and "network" in error
    assert "local clone" in error


def test_reader_errors(classification, retrieval, models):
    with pytest.raises(ClipforgeError, match=r"no split 'train' .*choose one of test"):
        load_wds("wds/shapes", classification, "train")
    with pytest.raises(ClipforgeError, match="pass it with --retrieval instead of --zero-shot"):
        _ours(f"wds/pairs={retrieval}", "zero_shot", models[3], models[4])
    (classification / "classnames.txt").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(ClipforgeError, match=r"labels outside 0\.\.1"):
        load_wds("wds/shapes", classification)
    (classification / "dataset_type.txt").write_text("detection\n", encoding="utf-8")
    with pytest.raises(ClipforgeError, match="must be retrieval or multilabel"):
        load_wds("wds/shapes", classification)
    (classification / "dataset_type.txt").unlink()
    (classification / "test" / "1.tar").write_bytes(b"junk" * 10)
    with pytest.raises(ClipforgeError, match="cannot read shard .*1.tar"):
        load_wds("wds/shapes", classification)
    with pytest.raises(ClipforgeError, match="hf-hub:ORG/REPO"):
        load_wds("wds/x", "hf-hub:justone")
    from clipforge.training.hooks import build_eval_hooks

    with pytest.raises(ClipforgeError, match="not evaluated during training yet"):
        build_eval_hooks([f"zero_shot:wds/shapes={classification}"], model=models[3], device=torch.device("cpu"),
                         seed=0)
