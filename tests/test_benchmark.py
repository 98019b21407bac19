"""clipforge benchmark: CLIP_benchmark's folder names and columns, the same numbers `clipforge eval` gives,
reuse of unchanged results, and one failing dataset named in its row while the rest run."""

from __future__ import annotations

import csv
import json

import pytest

from clipforge.cli.main import main
from clipforge.evaluation.benchmark import COLUMNS, dataset_location, read_dataset_list, task_of
from test_wds_benchmark import classification, models, multilabel, retrieval  # noqa: F401 (fixtures)


def test_names_map_to_clip_benchmark_folders(tmp_path):
    assert dataset_location("wds/vtab/cifar10", str(tmp_path)) == str(tmp_path / "wds_vtab-cifar10")
    assert dataset_location("wds/cifar10", "hf-hub:clip-benchmark") == "hf-hub:clip-benchmark/wds_cifar10"
    assert dataset_location("imagenet-a", str(tmp_path)) == str(tmp_path / "imagenet-a")
    assert task_of("wds/flickr30k", "hf-hub:clip-benchmark/wds_flickr30k") == "retrieval"
    (tmp_path / "list.txt").write_text("wds/cifar10  # the test split\n\n# comment\nimagenet\n")
    assert read_dataset_list(str(tmp_path / "list.txt")) == ["wds/cifar10", "imagenet"]
    assert read_dataset_list("wds/a, wds/b") == ["wds/a", "wds/b"]


def test_benchmark_table_equals_eval_and_reuses_results(classification, multilabel, retrieval, models,  # noqa: F811
                                                        tmp_path, capsys):
    root = classification.parent  # wds_shapes, wds_voc, wds_pairs side by side
    folder = models[0]
    common = ["--model", str(folder), "--workers", "0", "--no-progress"]
    out = tmp_path / "bench"
    names = "wds/shapes,wds/voc,wds/pairs,wds/missing"
    assert main(["benchmark", *common, "--root", str(root), "--datasets", names, "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "benchmark.csv").open()))
    assert list(rows[0]) == list(COLUMNS) and [r["dataset"] for r in rows] == names.split(",")
    by_name = {r["dataset"]: r for r in rows}
    assert by_name["wds/missing"]["error"] and not by_name["wds/shapes"]["error"]
    assert by_name["wds/pairs"]["task"] == "zeroshot_retrieval" and by_name["wds/voc"]["mean_average_precision"]
    # the same numbers as clipforge eval
    evals = tmp_path / "eval"
    assert main(["eval", *common, "--output", str(evals), "--zero-shot", f"wds/shapes={root / 'wds_shapes'}",
                 "--retrieval", f"wds/pairs={root / 'wds_pairs'}"]) == 0
    shapes = json.loads((evals / "zero_shot_wds_shapes.json").read_text())["metrics"]
    pairs = json.loads((evals / "retrieval_wds_pairs.json").read_text())["metrics"]
    assert float(by_name["wds/shapes"]["acc1"]) == pytest.approx(shapes["acc1"], abs=1e-12)
    assert float(by_name["wds/shapes"]["mean_per_class_recall"]) == pytest.approx(shapes["mean_per_class_recall"])
    for k in (1, 5, 10):
        assert float(by_name["wds/pairs"][f"image_retrieval_recall@{k}"]) == pytest.approx(pairs[f"text_to_image_R@{k}"])
        assert float(by_name["wds/pairs"][f"text_retrieval_recall@{k}"]) == pytest.approx(pairs[f"image_to_text_R@{k}"])
    assert "failed: " in (out / "benchmark.md").read_text()
    # a rerun reuses every unchanged result; a changed dataset file is evaluated again
    (root / "wds_voc" / "classnames.txt").write_text("a\nb\nc\nd\ne\n")
    assert main(["benchmark", *common, "--root", str(root), "--datasets", names, "--output", str(out)]) == 0
    again = {r["dataset"]: r for r in csv.DictReader((out / "benchmark.csv").open())}
    assert again["wds/shapes"]["reused"] == "True" and again["wds/pairs"]["reused"] == "True"
    assert again["wds/voc"]["reused"] == "False" and again["wds/shapes"]["acc1"] == by_name["wds/shapes"]["acc1"]


def test_every_dataset_failing_is_exit_1(models, tmp_path):  # noqa: F811
    assert main(["benchmark", "--model", str(models[0]), "--root", str(tmp_path), "--datasets", "wds/nothing",
                 "--output", str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 1
