"""The clipforge command: tables on success, one sentence and exit status 2 on user errors."""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.cli.main import main
from clipforge.models.config import config_from_dict
from conftest import SHARED_DATA, TINY_VIT, randomize_


@pytest.fixture
def checkpoint(tmp_path):
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    return model, clipforge.save(model, tmp_path / "tiny.safetensors")


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return path


def test_models_lists_every_architecture(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in clipforge.available_models())
    assert "151.28M" in out  # ViT-B-32


def test_classify_ranks_labels_like_the_python_api(checkpoint, image, capsys):
    model, path = checkpoint
    assert main(["classify", str(image), "--labels", "cat,dog,car", "--model", str(path), "--templates", "simple"]) == 0
    out = capsys.readouterr().out
    ranked = [line.split()[1] for line in out.splitlines() if line[:1].isdigit()]
    from clipforge.evaluation import build_zero_shot_classifier, get_templates

    classifier = build_zero_shot_classifier(model, ["cat", "dog", "car"], get_templates("simple"))
    preprocess = clipforge.image_transform(model.image_size)
    with torch.no_grad():
        scores = model.encode_image(preprocess(clipforge.load_image(image))[None], normalize=True) @ classifier
    assert ranked == [["cat", "dog", "car"][i] for i in scores[0].argsort(descending=True).tolist()]


def test_classify_reports_unreadable_image_and_goes_on(checkpoint, image, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    code = main(["classify", str(broken), str(image), "--labels", "a,b", "--model", str(checkpoint[1])])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in captured.err and str(image) in captured.out


@pytest.mark.parametrize("argv, message", [
    (["classify", "x.jpg", "--labels", "a", "--model", "ViT-B-33"], "released models are"),
    (["classify", "x.jpg", "--model", "ViT-B-32"], "no labels given"),
    (["convert", "/no/such/file.pt", "/tmp/out", "--to", "hf"], "neither an existing file"),
])
def test_user_errors_are_one_sentence(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_convert_to_each_format_round_trips(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    for fmt in ("hf", "open_clip", "clipforge"):
        assert main(["convert", str(path), str(tmp_path / fmt), "--to", fmt]) == 0
        loaded, _ = clipforge.load(tmp_path / fmt)
        assert torch.equal(loaded.visual.proj, model.visual.proj)


def test_classify_a_real_photo(checkpoint, capsys):
    photo = SHARED_DATA / "cifar10" / "test" / "cat" / "0000.jpg"
    if not photo.is_file():
        pytest.skip(f"CIFAR-10 images not found under {SHARED_DATA}; the shared data folder is absent")
    assert main(["classify", str(photo), "--labels", "cat,dog", "--model", str(checkpoint[1])]) == 0
