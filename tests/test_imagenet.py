"""ImageNet-1k built in: OpenAI's class names and templates as the reference package has them, the usual folder
layouts of ImageNet and its shifts, and the two ImageNet-A/-R protocols giving the same predictions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.errors import ClipforgeError
from clipforge.evaluation import imagenet
from clipforge.evaluation.datasets import dataset_classnames, dataset_templates, load_classification
from clipforge.evaluation.zero_shot import build_zero_shot_classifier

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_is_openais_and_the_importer_is_up_to_date():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert dataset_classnames("imagenet") == list(IMAGENET_CLASSNAMES)
    ours = dataset_templates("ImageNet-1k")
    assert len(ours) == 80 and [t.format("a cat") for t in ours] == [t("a cat") for t in OPENAI_IMAGENET_TEMPLATES]
    meta = imagenet.metadata()
    assert meta["synsets"] == sorted(meta["synsets"]) and len(set(meta["synsets"])) == 1000
    assert meta["synsets"][0] == "n01440764" and dataset_classnames("imagenet")[0] == "tench"
    assert len(dataset_classnames("imagenet-a")) == len(dataset_classnames("imagenet_r")) == 200
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_imagenet_metadata.py"), "--check"])
    assert check.returncode == 0, "imagenet.json differs from what the importer writes; rerun it"


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_folder_layouts_label_in_sorted_synset_order(tmp_path):
    synsets = imagenet.metadata()["synsets"]
    for i in (0, 5, 999):
        _image(tmp_path / "in" / "val" / synsets[i] / f"x{i}.JPEG", i)
        _image(tmp_path / "v2" / str(i) / f"y{i}.jpeg", i)
    data = load_classification("imagenet", tmp_path / "in")
    assert data.labels == [0, 5, 999] and data.classnames[999] == dataset_classnames("imagenet")[999]
    assert load_classification("imagenetv2", tmp_path / "v2").labels == [0, 5, 999]
    # Kaggle's flat validation folder with LOC_val_solution.csv
    _image(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG", 1)
    _image(tmp_path / "flat" / "ILSVRC2012_val_00000002.JPEG", 2)
    (tmp_path / "flat" / "LOC_val_solution.csv").write_text(
        f"ImageId,PredictionString\nILSVRC2012_val_00000001,{synsets[7]} 1 2 3 4\n"
        f"ILSVRC2012_val_00000002,{synsets[3]} 1 2 3 4 {synsets[3]} 5 6 7 8\n")
    assert load_classification("imagenet", tmp_path / "flat").labels == [7, 3]
    with pytest.raises(ClipforgeError, match="synset folders"):
        load_classification("imagenet-sketch", tmp_path / "v2")


def test_imagenet_a_head_over_200_names_equals_the_restricted_1000_class_head(tmp_path):
    """CLIP_benchmark's protocol (200 names) and wise-ft's (1,000-class head, 200 columns kept) agree."""
    subset = imagenet.synsets_of("imagenet-a")
    for k, synset in enumerate(subset):
        _image(tmp_path / "imagenet-a" / synset / f"{k}.jpg", k)
    data = load_classification("imagenet-a", tmp_path)
    assert len(data) == 200 and data.labels == list(range(200))
    assert data.classnames == [dataset_classnames("imagenet")[i] for i in imagenet.subset_columns("imagenet-a")]
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Tiny-32").eval()
    templates = dataset_templates("imagenet")[:2]
    full = build_zero_shot_classifier(model, dataset_classnames("imagenet"), templates)
    narrow = build_zero_shot_classifier(model, data.classnames, templates)
    columns = torch.tensor(imagenet.subset_columns("imagenet-a"))
    restricted = full[:, columns]  # classifiers are [embed_dim, classes]
    torch.testing.assert_close(restricted, narrow, rtol=1e-5, atol=1e-6)
    features = torch.nn.functional.normalize(torch.randn(64, restricted.shape[0]), dim=-1)
    assert torch.equal((features @ restricted).argmax(1), (features @ narrow).argmax(1))


def test_effective_robustness_plot(tmp_path):
    from clipforge.evaluation.robustness_plot import plot_effective_robustness, robustness_points

    rows = [{"dataset": "wds/imagenet1k", "model": "m", "acc1": 0.6}, {"dataset": "wds/imagenetv2", "model": "m",
             "acc1": 0.52}, {"dataset": "imagenet-a", "model": "m", "acc1": 0.1},
            {"dataset": "imagenet-r", "model": "m", "acc1": "", "error": "missing"},
            {"dataset": "cifar10", "model": "m", "acc1": 0.9}, {"dataset": "imagenet-sketch", "model": "other",
                                                              "acc1": 0.3}]
    assert robustness_points(rows) == {"m": {"imagenet": 0.6, "imagenet-v2": 0.52, "imagenet-a": 0.1}}
    path = plot_effective_robustness(rows, tmp_path / "robustness.png")
    assert path is not None and Image.open(path).size[0] > 300
    assert plot_effective_robustness(rows[4:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_objectnet_as_clip_benchmark_reads_it(tmp_path):
    """113-way head in CLIP_benchmark's protocol: mapped classes only, sorted folders, ObjectNet's names."""
    import json

    mappings = tmp_path / "objectnet-1.0" / "mappings"
    mappings.mkdir(parents=True)
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "zebra_toy": "Toy zebra"}))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Banana": "banana", "Alarm clock": "analog clock; digital clock"}))  # the toy maps to nothing
    for k, folder in enumerate(["banana", "alarm_clock", "zebra_toy", "banana"]):
        _image(tmp_path / "objectnet-1.0" / "images" / folder / f"{k}.png", k)
    data = load_classification("objectnet", tmp_path)
    assert data.classnames == ["alarm clock", "banana"] and sorted(data.labels) == [0, 1, 1]
    assert dataset_templates("objectnet") == dataset_templates("imagenet")
    with pytest.raises(ClipforgeError, match="no ObjectNet"):
        load_classification("objectnet", tmp_path / "objectnet-1.0" / "images")
