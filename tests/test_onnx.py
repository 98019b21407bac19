"""ONNX export and the torch-free runtime: graphs equal PyTorch to 1e-4 at several batch sizes and text lengths,
numpy preprocessing equals the torch transform bit for bit, and embed / index / search / serve run on an export
with torch blocked, giving the torch path's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, TINY_RESNET, TINY_VIT, randomize_
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.errors import ClipforgeError

ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need the onnx extra: pip install 'clipforge[onnx]'")
pytest.importorskip("onnx", reason="the ONNX tests need the onnx extra: pip install 'clipforge[onnx]'")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> dict:
    """A random tiny ViT saved in open_clip's folder format, exported through the command line."""
    root = tmp_path_factory.mktemp("onnx_vit")
    source = root / "open_clip_vit"
    clipforge.save(randomize_(clipforge.create_model(TINY_VIT), seed=5).eval(), source, format="open_clip")
    export = root / "export"
    assert main(["export", str(source), str(export), "--to", "onnx"]) == 0
    model, preprocess = clipforge.load(source)
    return {"source": source, "export": export, "model": model, "preprocess": preprocess}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> dict:
    """A random tiny ModifiedResNet (BatchNorm statistics perturbed) as a clipforge file, exported by the API."""
    from clipforge.export import export_onnx

    root = tmp_path_factory.mktemp("onnx_rn")
    source = root / "rn.safetensors"
    clipforge.save(randomize_(clipforge.create_model(TINY_RESNET), seed=6).eval(), source)
    export = root / "export"
    export_onnx(source, export)
    model, preprocess = clipforge.load(source)
    return {"source": source, "export": export, "model": model, "preprocess": preprocess}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("which", ["vit", "resnet"])
def test_graphs_equal_pytorch_at_two_batch_sizes_and_two_text_lengths(which, request):
    towers = request.getfixturevalue(which)
    model, export = towers["model"], towers["export"]
    manifest = json.loads((export / "clipforge_onnx.json").read_text())
    mean = torch.tensor(manifest["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(manifest["preprocess"]["std"]).view(1, 3, 1, 1)
    size = model.config.vision.image_size
    image, text = _session(export / "image.onnx"), _session(export / "text.onnx")
    for batch in (1, 5):
        pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        got, raw = image.run(["image_embeds", "image_features"], {"pixels": pixels.numpy()})
        with torch.no_grad():
            expected = model.encode_image((pixels - mean) / std)
        assert got.shape == (batch, model.config.embed_dim)
        assert np.abs(raw - expected.numpy()).max() <= TOLERANCE * max(1.0, float(expected.abs().max()))
        assert np.abs(got - torch.nn.functional.normalize(expected, dim=-1).numpy()).max() <= TOLERANCE
    ids = model.tokenize(CAPTIONS)  # [5, 77]
    for batch, length in ((5, 77), (2, 16)):
        tokens = ids[:batch, :length].clone()
        tokens[:, -1] = torch.where(tokens[:, -1] == 0, tokens[:, -1], 49407)  # a cut text still ends in [EOS]
        got = text.run(["text_embeds"], {"input_ids": tokens.numpy()})[0]
        with torch.no_grad():
            expected = model.encode_text(tokens, normalize=True).numpy()
        assert got.shape == (batch, model.config.embed_dim)
        assert np.abs(got - expected).max() <= TOLERANCE, (batch, length)


def test_manifest_records_what_the_runtime_needs(vit):
    manifest = json.loads((vit["export"] / "clipforge_onnx.json").read_text())
    assert manifest["format"] == "clipforge-onnx" and manifest["embed_dim"] == TINY_VIT["embed_dim"]
    pre = manifest["preprocess"]
    assert pre["image_size"] == 32 and pre["resize_mode"] == "shortest" and pre["interpolation"] == "bicubic"
    assert len(pre["mean"]) == len(pre["std"]) == 3
    tokenizer = manifest["tokenizer"]
    assert tokenizer["context_length"] == 77 and tokenizer["clean"] == "lower" and tokenizer["trim_to_pooled"]
    assert manifest["image"]["inputs"] == ["pixels"] and manifest["text"]["inputs"] == ["input_ids"]
    assert max(manifest["max_abs_diff"].values()) <= TOLERANCE
    assert {"clipforge", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert sorted(p.name for p in vit["export"].iterdir()) == ["clipforge_onnx.json", "image.onnx", "text.onnx"]
    assert not [p for p in vit["export"].parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, mode in enumerate(("RGB", "L", "RGBA", "P", "RGB", "RGB")):
        pixels = rng.integers(0, 256, (20 + 7 * i, 45 - 3 * i, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        path = folder / f"img{i}.{'jpg' if mode in ('RGB', 'L') and i % 2 == 0 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_numpy_preprocessing_equals_the_torch_transform(tmp_path, mode):
    from clipforge.runtime.onnx_model import OnnxPreprocess
    from clipforge.transforms import image_transform
    from clipforge.transforms.core import channel_array, normalize_array

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for interpolation in ("bicubic", "bilinear"):
        ours = OnnxPreprocess(24, interpolation, mode, fill_color=17)
        theirs = image_transform(24, mean=mean, std=std, interpolation=interpolation, resize_mode=mode, fill_color=17)
        for path in _images(tmp_path / "images"):
            unit = ours(path)
            assert unit.dtype == np.float32 and unit.shape == (3, 24, 24) and 0 <= unit.min() and unit.max() <= 1
            normalized = normalize_array(unit.copy(), channel_array(mean), channel_array(std))
            assert torch.equal(torch.from_numpy(normalized), theirs(path)), (path.name, interpolation)


def test_onnx_clip_equals_the_torch_model(vit, tmp_path):
    from clipforge.runtime import OnnxCLIP

    model, preprocess = vit["model"], vit["preprocess"]
    onnx = OnnxCLIP.load(vit["export"], threads=1)
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(CAPTIONS), normalize=True).numpy()
        paths = _images(tmp_path / "images")
        images = model.encode_image(torch.stack([preprocess(p) for p in paths]), normalize=True).numpy()
    assert np.abs(onnx.encode_text(CAPTIONS) - texts).max() <= TOLERANCE
    assert np.abs(onnx.encode_image([str(p) for p in paths]) - images).max() <= TOLERANCE
    assert np.abs(onnx.encode_image([Image.open(p) for p in paths], batch_size=4) - images).max() <= TOLERANCE
    assert onnx.encode_text("one text").shape == (1, TINY_VIT["embed_dim"])
    assert onnx.tokenize(CAPTIONS).dtype == np.int64
    np.testing.assert_array_equal(onnx.tokenize(CAPTIONS), model.tokenize(CAPTIONS).numpy())


TORCH_FREE = textwrap.dedent('''
    import json, sys
    sys.modules["torch"] = None  # every import of torch now fails
    import numpy as np
    from clipforge.cli.main import main
    from clipforge.runtime import OnnxCLIP

    export, photos, work = sys.argv[1:4]
    model = OnnxCLIP.load(export)
    np.save(work + "/texts.npy", model.encode_text(["a red circle", "two dogs"]))
    assert main(["embed", photos, work + "/emb", "--model", export, "--dtype", "float32", "--workers", "2",
                 "--no-progress"]) == 0
    assert main(["index", photos, work + "/index", "--model", export, "--workers", "0"]) == 0
    assert main(["index", work + "/emb", work + "/index2"]) == 0
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", work + "/index", "--text", "a red circle", "-k", "3", "--json"]) == 0
    searched = [r["id"] for r in json.loads(out.getvalue())["results"]]
    from fastapi.testclient import TestClient
    from clipforge.collection.server import create_app
    client = TestClient(create_app(work + "/index"))
    served = client.post("/api/search", json={"text": "a red circle", "k": 3}).json()
    json.dump({"served": [r["id"] for r in served["results"]], "searched": searched}, open(work + "/served.json", "w"))
    assert "torch" not in {name.split(".")[0] for name, mod in sys.modules.items() if mod is not None}
''')


def test_embed_index_search_and_serve_run_without_torch(vit, tmp_path, capsys):
    from clipforge.collection import layout
    from clipforge.collection.embed import embed_collection
    from clipforge.collection.index import load_index
    from clipforge.collection.search import search_text

    photos = tmp_path / "photos"
    _images(photos)
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "torch_free.py"
    script.write_text(TORCH_FREE)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(script), str(vit["export"]), str(photos), str(work)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    model = vit["model"]
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(["a red circle", "two dogs"]), normalize=True).numpy()
    assert np.abs(np.load(work / "texts.npy") - texts).max() <= TOLERANCE
    # the collection equals the torch path's, row for row
    embed_collection(photos, tmp_path / "torch_emb", model, vit["preprocess"], dtype="float32", precision="fp32",
                     num_workers=0, progress=False)
    onnx_rows = layout.read_embeddings(work / "emb", "img")[0]
    torch_rows = layout.read_embeddings(tmp_path / "torch_emb", "img")[0]
    assert onnx_rows.shape == torch_rows.shape == (6, TINY_VIT["embed_dim"])
    assert np.abs(onnx_rows - torch_rows).max() <= TOLERANCE
    info = json.loads((work / "emb" / "embed_info.json").read_text())
    assert info["model"] == str(vit["export"]) and info["precision"] == "fp32"
    # the index records the export as its model, so searching it (here, with torch loaded) uses the export too
    index = load_index(work / "index")
    assert index.model_spec["source"] == str(vit["export"])
    hits = search_text(index, "a red circle", 3)
    found = json.loads((work / "served.json").read_text())
    assert [h.id for h in hits] == found["served"] == found["searched"]
    assert main(["search", str(work / "index2"), "--text", "a red circle", "-k", "3", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["results"]] == [h.id for h in hits]


def _error(args: list[str], capsys) -> str:
    assert main(args) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("clipforge: error: ") and "\n" not in message and "Traceback" not in message
    return message


def test_bad_inputs_are_one_sentence(vit, tmp_path, capsys):
    from clipforge.runtime import OnnxCLIP

    assert "not an export format" in _error(["export", str(vit["source"]), str(tmp_path / "x"), "--to", "tflite"],
                                            capsys)
    assert "not empty" in _error(["export", str(vit["source"]), str(vit["export"]), "--to", "onnx"], capsys)
    assert "at least 14" in _error(["export", str(vit["source"]), str(tmp_path / "x"), "--to", "onnx", "--opset",
                                    "9"], capsys)
    assert "does not exist" in _error(["export", str(vit["source"]), str(tmp_path / "no" / "x"), "--to", "onnx"],
                                      capsys)
    assert "holds it" in _error(["export", str(vit["source"]), str(vit["source"].parent), "--to", "onnx",
                                 "--overwrite"], capsys)
    assert not (tmp_path / "x").exists()
    assert "ViT-Nope" in _error(["export", "ViT-Nope", str(tmp_path / "y"), "--to", "onnx"], capsys)
    with pytest.raises(ClipforgeError, match="does not exist"):
        OnnxCLIP.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("image.onnx", "text.onnx"):
        (broken / name).write_bytes((vit["export"] / name).read_bytes())
    with pytest.raises(ClipforgeError, match="no clipforge_onnx.json"):
        OnnxCLIP.load(broken)
    (broken / "clipforge_onnx.json").write_text((vit["export"] / "clipforge_onnx.json").read_text())
    (broken / "image.onnx").write_bytes(b"not a graph")
    with pytest.raises(ClipforgeError, match="image.onnx.* not a graph onnxruntime can load"):
        OnnxCLIP.load(broken)
    (broken / "clipforge_onnx.json").write_text("{")
    with pytest.raises(ClipforgeError, match="cannot be read"):
        OnnxCLIP.load(broken)
    _images(tmp_path / "photos")
    message = _error(["embed", str(tmp_path / "photos"), str(tmp_path / "out"), "--model", str(vit["export"]),
                      "--image-size", "64"], capsys)
    assert "--image-size does not apply to an ONNX export" in message
    model = OnnxCLIP.load(vit["export"])
    with pytest.raises(ClipforgeError, match=r"\[N, 3, 32, 32\]"):
        model.encode_image_pixels(np.zeros((1, 3, 16, 16), np.float32))


def test_export_overwrite_replaces_atomically_and_package_import_is_lazy(vit, tmp_path):
    from clipforge.export import export_onnx

    target = tmp_path / "again"
    target.mkdir()
    (target / "old.txt").write_text("old")
    export_onnx(vit["source"], target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["clipforge_onnx.json", "image.onnx", "text.onnx"]
    code = ("import sys; import clipforge, clipforge.runtime, clipforge.transforms.core, clipforge.collection.embed; "
            "import clipforge.cli.main as m; m.build_parser(); print('torch' in sys.modules); "
            "from clipforge import load, tokenize, CLIP; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["False", "True"]
