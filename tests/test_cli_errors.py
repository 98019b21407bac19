"""Nothing a user does makes the commands crash: each bad input is one line and exit status 2, bad files are
skipped by name and reason, and the set-up commands in README.md are the ones CI runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.models.config import config_from_dict
from conftest import REPO_ROOT, TINY_VIT, randomize_

LATIN1 = "caf\xe9 au lait\n".encode("latin-1")  # not UTF-8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    return str(clipforge.save(model, tmp_path_factory.mktemp("model") / "tiny.safetensors"))


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two classes of two images; class 'a' also holds a dangling link and a link loop."""
    root = tmp_path / "images"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(10 * c + i).integers(0, 256, (36, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    os.symlink(tmp_path / "gone.png", root / "a" / "dangling.png")
    os.symlink("loop.png", root / "a" / "loop.png")
    return root


def one_line_error(capsys, argv: list[str], expected: str) -> str:
    """Run argv: exit status 2, stderr one 'clipforge: error:' line holding ``expected``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipforge: error: "), err
    assert expected in err and "Traceback" not in err and len(err) < 400, err
    return err


def test_eval_skips_dangling_links_and_loops_and_lists_each(model_path, folder, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["eval", "--model", model_path, "--zero-shot", f"imagefolder={folder}", "--workers", "0",
                 "--no-progress", "--output", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "dangling.png" in printed and "loop.png" in printed and "missing_file=2" in printed
    result = json.loads((out / "zero_shot_imagefolder.json").read_text())
    assert result["metrics"]["skipped"] == {"missing_file": 2} and result["metrics"]["num_samples"] == 4
    listed = {Path(item["path"]).name: item["reason"] for item in result["skipped_files"]}
    assert listed == {"dangling.png": "missing_file", "loop.png": "missing_file"}


@pytest.mark.parametrize("where", ["labels", "templates", "classnames", "eval-templates"])
def test_option_files_that_are_not_utf8_are_one_sentence(model_path, folder, tmp_path, capsys, where):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(LATIN1)
    argv = {"labels": ["classify", str(folder), "--model", model_path, "--labels-file", str(bad)],
            "templates": ["classify", str(folder), "--model", model_path, "--labels", "a", "--templates", str(bad)],
            "classnames": ["eval", "--model", model_path, "--zero-shot", f"imagefolder={folder},classnames={bad}"],
            "eval-templates": ["eval", "--model", model_path, "--zero-shot", f"imagefolder={folder},templates={bad}",
                               "--workers", "0", "--no-progress", "--output", str(tmp_path / "out")]}[where]
    one_line_error(capsys, argv, "not UTF-8")


@pytest.mark.parametrize("argv, expected", [
    (["classify", "x.png", "--model", "m", "--top", "-1"], "--top: must be a positive whole number, got -1"),
    (["classify", "x.png", "--model", "m", "--top", "0"], "--top"),
    (["classify", "x.png", "--model", "m", "--top", "many"], "got 'many'"),
    (["eval", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--workers", "-1"], "--workers: must be a whole number, 0 or more"),
    (["eval", "--model", "m", "--threads", "0"], "--threads"),
    (["classify", "x.png", "--model", "m", "--threads", "-2"], "--threads"),
    (["classify", "x.png", "--model", "m", "--labels", "a", "--image-size", "100000"], "--image-size"),
    (["classify", "x.png", "--model", "", "--labels", "a"], "empty"),
    (["classify", "x.png", "--model", "m" * 3000, "--labels", "a"], "File name too long"),
    (["no-such-command"], "invalid choice"),
    ([], "required"),
])
def test_bad_numbers_and_usage_are_one_line(capsys, argv, expected):
    one_line_error(capsys, argv, expected)


@pytest.mark.parametrize("device, expected", [
    ("banana", "is not a device; use cpu, cuda"),
    ("cuda", "CUDA was asked for but torch sees no GPU; use --device cpu"),
    ("cuda:7", "cuda:7"),
])
def test_devices_are_checked_before_loading(folder, capsys, device, expected):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(capsys, ["classify", str(folder), "--model", "/no/model.pt", "--labels", "a", "--device", device],
                   expected)
    one_line_error(capsys, ["eval", "--model", "/no/model.pt", "--zero-shot", f"imagefolder={folder}",
                            "--device", device], expected)


@pytest.mark.parametrize("spec, expected", [
    ("imagefolder={folder},max_samples=abc", "max_samples must be a positive whole number, got 'abc'"),
    ("imagefolder={folder},max_samples=-3", "got -3"),
    ("imagefolder={folder},foo=bar", "'foo=bar' is not KEY=VALUE"),
    ("imagefolder", "expects NAME=PATH"),
    ("=images", "needs a dataset format"),
    ("imagenette={folder}", "unknown zero-shot dataset format 'imagenette'"),
    ("imagefolder={folder},split=val", "split 'val'"),
    ("imagefolder={folder}/nowhere", "does not exist"),
    ("imagefolder={folder}," + "x" * 2000 + "=1", "is not KEY=VALUE"),
])
def test_eval_specs_are_checked_before_loading(folder, capsys, spec, expected):
    # The model does not exist: each error must come from the spec, before any loading.
    one_line_error(capsys, ["eval", "--model", "/no/model.pt", "--zero-shot", spec.format(folder=folder)], expected)


def test_classify_takes_folders_and_writes_csv_and_json(model_path, folder, tmp_path, capsys):
    (folder / "b" / "notes.txt").write_text("not an image", encoding="utf-8")
    (folder / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    for suffix in ("csv", "json"):
        target = tmp_path / "out" / f"results.{suffix}"
        code = main(["classify", str(folder), "--model", model_path, "--labels", "red,green,blue", "--top", "2",
                     "--templates", "none", "--output", str(target), "--threads", "1"])
        captured = capsys.readouterr()
        assert code == 1  # some images were skipped
        assert "broken.jpg" in captured.err and "missing_file=2, unreadable_image=1" in captured.err
    with open(tmp_path / "out" / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [Path(row["path"]).relative_to(folder).as_posix() for row in rows]
    assert names == ["a/0.png", "a/1.png", "a/dangling.png", "a/loop.png", "b/0.png", "b/1.png", "b/broken.jpg"]
    reasons = {Path(row["path"]).name: row["skipped"] for row in rows if row["skipped"]}
    assert reasons == {"dangling.png": "missing_file", "loop.png": "missing_file", "broken.jpg": "unreadable_image"}
    good = [row for row in rows if not row["skipped"]]
    assert all(row["label_1"] in ("red", "green", "blue") and float(row["prob_1"]) >= float(row["prob_2"])
               for row in good)
    report = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert report["skipped"] == {"missing_file": 2, "unreadable_image": 1} and len(report["images"]) == 7
    assert [item["label"] for item in report["images"][0]["top"]] == [rows[0]["label_1"], rows[0]["label_2"]]
    one_line_error(capsys, ["classify", str(folder), "--model", model_path, "--labels", "a", "--output", "r.txt"],
                   "must end in .csv or .json")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["classify", str(tmp_path / "empty"), "--model", model_path, "--labels", "a"],
                   "holds no image files")


def test_version_and_threads(model_path, folder, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clipforge {clipforge.__version__}"
    before = torch.get_num_threads()
    try:
        assert main(["classify", str(folder / "b"), "--model", model_path, "--labels", "a,b", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run takes README.md's second fenced block; it must be the script that installs the test extra."""
    extract = next(line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if "awk" in line)
    program = extract.split("awk '", 1)[1].split("'", 1)[0]
    command = subprocess.run(["awk", program, "README.md"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert command == "bash scripts/test.sh"
    script = (REPO_ROOT / "scripts" / "test.sh").read_text()
    assert '".[test]"' in script and "exec .venv/bin/python -m pytest" in script
    assert '".[test]"' not in (REPO_ROOT / "scripts" / "setup.sh").read_text()  # the main job's set-up: runtime only
