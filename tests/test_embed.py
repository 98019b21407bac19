"""``clipforge embed``: clip-retrieval's layout, equal to open_clip's embeddings, resumable after SIGKILL,
shared among ranks, from folders, tables, text files and shards, with bad inputs skipped and named."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_VIT, randomize_
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.collection import layout
from clipforge.collection.embed import embed_collection, embed_image_files
from clipforge.data.skips import read_skipped_tsv
from clipforge.errors import ClipforgeError

pa = pytest.importorskip("pyarrow")  # clipforge[search]
pq = pytest.importorskip("pyarrow.parquet")

IMAGES = 30
BAD = {"a/corrupt.jpg": "unreadable_image", "a/dangling.png": "missing_file", "b/c/loop.jpg": "missing_file"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(open_clip folder, model, preprocess): a random tiny ViT saved as open_clip writes it, loaded back."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    clipforge.save(randomize_(clipforge.create_model(TINY_VIT), seed=3).eval(), folder, format="open_clip")
    model, preprocess = clipforge.load(folder)
    return folder, model, preprocess


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 small images of assorted sizes and modes in a nested tree, plus a corrupt file, a dangling link, a link
    loop, a hidden image and a non-image file (the last two must be ignored)."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        sub = root / ("a", "b", "b/c")[i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (24 + i, 40 - i // 2, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(("RGB", "L", "RGBA")[i % 3] if i % 5 else "RGB")
        image.save(sub / f"img{i:02d}.{'jpg' if i % 4 == 0 and image.mode != 'RGBA' else 'png'}")
    (root / "a/corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "a/dangling.png").symlink_to(root / "nowhere.png")
    (root / "b/c/loop.jpg").symlink_to("loop.jpg")
    Image.new("RGB", (8, 8)).save(root / "a/.hidden.png")
    (root / "b/notes.txt").write_text("not an image")
    return root


def _expected_paths(root: Path) -> list[str]:
    found = [p for p in root.rglob("*") if not p.name.startswith(".") and p.suffix in (".jpg", ".png")]
    return sorted(str(p) for p in found)


def _good(root: Path) -> list[str]:
    return [p for p in _expected_paths(root) if os.path.relpath(p, root) not in BAD]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _embed(tiny, source, out, **kwargs):
    _, model, preprocess = tiny
    options = {"num_workers": 0, "part_size": 8, "precision": "fp32", "progress": False, **kwargs}
    return embed_collection(source, out, model, preprocess, **options)


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    status = main(["embed", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def reference(tiny, photos, tmp_path_factory):
    """One uninterrupted single-process run (float16 storage, fp32 compute): what every other run must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    info = _embed(tiny, photos, out, dtype="float16")
    return out, info


def test_embeddings_equal_open_clips_and_metadata_is_aligned(tiny, photos, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    folder, _, _ = tiny
    info = _embed(tiny, photos, tmp_path / "out", dtype="float32", num_workers=2)
    vectors, table = layout.read_embeddings(tmp_path / "out")
    assert vectors.dtype == np.float32 and vectors.shape == (IMAGES, TINY_VIT["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    paths = table.column("image_path").to_pylist()
    assert paths == _good(photos)  # sorted relative paths, hidden and non-image files left out, bad ones skipped
    for path, size, mtime in zip(paths, table.column("size").to_pylist(), table.column("mtime").to_pylist()):
        stat = os.stat(path)
        assert (size, mtime) == (stat.st_size, stat.st_mtime)
    assert table.column("caption").null_count == IMAGES
    assert table.schema.field("size").type == pa.int64() and table.schema.field("mtime").type == pa.float64()

    reference_model, reference_preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    with torch.no_grad():
        pixels = torch.stack([reference_preprocess(Image.open(p)) for p in paths])
        expected = torch.nn.functional.normalize(reference_model.eval().encode_image(pixels), dim=-1).numpy()
    assert _cosines(vectors, expected).min() >= 0.9999

    half, _ = layout.read_embeddings(tmp_path / "out", dtype=None)
    assert half.dtype == np.float32  # stored as asked
    assert info.complete and info.counts == {"items": IMAGES + len(BAD), "img": IMAGES, "skipped": len(BAD)}


def test_float16_storage_skips_named_and_embed_info(reference, photos, tiny):
    out, info = reference
    vectors, table = layout.read_embeddings(out, dtype=None)
    assert vectors.dtype == np.float16
    exact, _, _ = embed_image_files(tiny[1], tiny[2], table.column("image_path").to_pylist(), num_workers=0)
    assert _cosines(vectors, exact).min() >= 0.9995  # float16 rounding only
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)
    written = json.loads((out / "embed_info.json").read_text())
    assert written == info.to_dict() == layout.EmbedInfo.read(out).to_dict()
    assert written["skipped"] == {"missing_file": 2, "unreadable_image": 1}
    assert written["embed_dim"] == TINY_VIT["embed_dim"] and written["dtype"] == "float16"
    assert written["part_size"] == 8 and written["parts"] == 5 and written["complete"] is True
    named = {os.path.relpath(source, photos): reason for source, reason, _ in read_skipped_tsv(out / "skipped.tsv")}
    assert named == BAD
    assert {os.path.relpath(item["source"], photos) for item in written["skipped_items"]} == set(BAD)
    details = {os.path.relpath(s, photos): d for s, _, d in read_skipped_tsv(out / "skipped.tsv")}
    assert "dangling" in details["a/dangling.png"] and "loop" in details["b/c/loop.jpg"]


def test_layout_reads_as_clip_retrieval_reads_it(reference, tmp_path, tiny, photos):
    out, _ = reference
    # clip-retrieval's tools (and autofaiss' embedding-reader) list each folder by name and pair file i with file i.
    npys = sorted((out / "img_emb").glob("*.npy"))
    parquets = sorted((out / "metadata").glob("*.parquet"))
    assert [p.name for p in npys] == [f"img_emb_{n}.npy" for n in range(5)]
    assert [p.name for p in parquets] == [f"metadata_{n}.parquet" for n in range(5)]
    assert not (out / "text_emb").exists()
    arrays = [np.load(p) for p in npys]
    tables = [pq.read_table(p) for p in parquets]
    assert all(a.shape[0] == t.num_rows for a, t in zip(arrays, tables))
    vectors, table = layout.read_embeddings(out, dtype=None)
    assert np.array_equal(np.concatenate(arrays), vectors)
    assert pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).equals(table)
    assert tables[0].column_names == ["image_path", "caption", "size", "mtime"]
    assert layout.list_parts(out) == [0, 1, 2, 3, 4]
    # clip-retrieval zero-pads N to the digits of the part count: 11 parts are _00 ... _10
    padded = _embed(tiny, photos, tmp_path / "padded", part_size=3)
    assert padded.parts == 11
    assert sorted(p.name for p in (tmp_path / "padded/img_emb").iterdir())[:2] == ["img_emb_00.npy", "img_emb_01.npy"]
    np.testing.assert_allclose(layout.read_embeddings(tmp_path / "padded")[0], layout.read_embeddings(out)[0],
                               atol=2e-3)  # other batch shapes: float rounding only


_KILL_AFTER_FIRST_PART = """
import os, signal, sys
from clipforge.collection import layout
real, calls = layout.write_part, []
def write_part(folder, n, *args, **kwargs):
    calls.append(n)
    if len(calls) == 2:  # killed while writing the second part: its array is in, its parquet is not
        (layout.Path(folder) / "img_emb" / f".img_emb_{n}.npy.tmp-abcd1234").write_bytes(b"half")
        (layout.Path(folder) / "img_emb" / f"img_emb_{n}.npy").write_bytes(b"garbage")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(folder, n, *args, **kwargs)
layout.write_part = write_part
from clipforge.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_resumes_without_recomputing(reference, tiny, photos, tmp_path, capsys):
    folder, _, _ = tiny
    out = tmp_path / "out"
    args = [str(photos), str(out), "--model", str(folder), "--part-size", "8", "--precision", "fp32",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_PART, "embed", *args, "--workers", "1"], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr
    assert layout.list_parts(out) == [0] and not (out / "embed_info.json").exists()
    first = {p: p.stat().st_mtime_ns for p in (out / "img_emb/img_emb_0.npy", out / "metadata/metadata_0.parquet")}

    status, printed, _ = _run_cli(args + ["--workers", "0", "--no-progress"], capsys)
    assert status == 0 and "embedded 30 images" in printed
    assert {p: p.stat().st_mtime_ns for p in first} == first  # the finished part was kept, not recomputed
    assert not [p for p in (out / "img_emb").iterdir() if p.name.startswith(".")]  # the leftover temporary is gone
    expected, expected_table = layout.read_embeddings(reference[0], dtype=None)
    vectors, table = layout.read_embeddings(out, dtype=None)
    assert table.equals(expected_table)
    np.testing.assert_allclose(vectors.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    assert json.loads((out / "embed_info.json").read_text())["counts"] == reference[1].counts


def test_two_ranks_write_disjoint_parts_whose_union_is_the_whole(reference, tiny, photos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = _embed(tiny, photos, out, rank=0, world_size=2)
    assert layout.list_parts(out) == [0, 2, 4]
    assert not first.complete and first.parts_done == 3 and not (out / "embed_info.json").exists()
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = _embed(tiny, photos, out)
    assert layout.list_parts(out) == [0, 1, 2, 3, 4]
    assert second.complete and second.to_dict() == reference[1].to_dict()
    expected, expected_table = layout.read_embeddings(reference[0], dtype=None)
    vectors, table = layout.read_embeddings(out, dtype=None)
    assert table.equals(expected_table) and np.array_equal(vectors, expected)
    assert read_skipped_tsv(out / "skipped.tsv") == read_skipped_tsv(reference[0] / "skipped.tsv")


def test_csv_with_captions_embeds_both_row_aligned(tiny, photos, tmp_path, capsys):
    folder, model, _ = tiny
    good = _good(photos)
    table = tmp_path / "pairs.tsv"
    rows = [(os.path.relpath(p, photos), f"caption number {i}") for i, p in enumerate(good[:6])]
    rows += [("missing.png", "a missing file"), (rows[0][0], "   "), ("a/corrupt.jpg", "corrupt")]
    table.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    out = tmp_path / "out"
    status, printed, _ = _run_cli([str(table), str(out), "--model", str(folder), "--caption-column", "title",
                                   "--image-root", str(photos), "--precision", "fp32", "--dtype", "float32",
                                   "--workers", "0", "--device", "cpu", "--no-progress"], capsys)
    assert status == 0 and "6 images and 6 texts" in printed
    images, meta = layout.read_embeddings(out, "img")
    texts, text_meta = layout.read_embeddings(out, "text")
    assert meta.equals(text_meta) and images.shape == texts.shape == (6, TINY_VIT["embed_dim"])
    assert meta.column("caption").to_pylist() == [c for _, c in rows[:6]]
    assert meta.column("image_path").to_pylist() == good[:6]
    with torch.no_grad():
        expected = model.encode_text(model.tokenize([c for _, c in rows[:6]]), normalize=True).numpy()
    assert _cosines(texts, expected).min() >= 0.9999
    reasons = {source.rsplit(":", 1)[1]: reason for source, reason, _ in read_skipped_tsv(out / "skipped.tsv")}
    assert reasons == {"8": "missing_file", "9": "empty_caption", "10": "unreadable_image"}  # file lines


def test_texts_only_from_a_text_file(tiny, tmp_path, capsys):
    folder, model, _ = tiny
    lines = ["a dog on the grass", "", "two cats", "a " * 100 + "very long caption"]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    status, printed, _ = _run_cli(["--texts", str(tmp_path / "texts.txt"), str(out), "--model", str(folder),
                                   "--precision", "fp32", "--workers", "0", "--device", "cpu", "--no-progress"],
                                  capsys)
    assert status == 0 and "3 texts" in printed
    assert not (out / "img_emb").exists()
    texts, meta = layout.read_embeddings(out, "text")
    assert meta.column("caption").to_pylist() == [lines[0], lines[2], lines[3]]
    assert meta.column("image_path").null_count == 3
    with torch.no_grad():
        expected = model.encode_text(model.tokenize([lines[0], lines[2], lines[3]]), normalize=True).numpy()
    assert _cosines(texts, expected).min() >= 0.999  # float16 storage
    info = layout.EmbedInfo.read(out)
    assert info.kinds == ["text"] and info.skipped == {"empty_caption": 1}


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tiny, photos, tmp_path, capsys):
    folder, model, preprocess = tiny
    good = _good(photos)
    jpeg = [p for p in good if p.endswith(".jpg")]
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "0.tar", [(f"s{i}", {"jpg": Path(p).read_bytes(), "txt": f"photo {i}".encode()})
                                    for i, p in enumerate(jpeg[:3])] + [("bad", {"jpg": b"junk", "txt": b"bad"}),
                                                                        ("textonly", {"txt": b"no image"})])
    _write_shard(shards / "1.tar", [("t0", {"jpg": Path(jpeg[3]).read_bytes(), "txt": b"last photo"})])
    with tarfile.open(shards / "0.tar") as tar:
        cut = tar.getmember("s1.jpg").offset_data + 10
    (shards / "2.tar").write_bytes((shards / "0.tar").read_bytes()[:cut])  # cut inside the second sample
    out = tmp_path / "out"
    status, _, _ = _run_cli([str(shards / "{0..2}.tar"), str(out), "--model", str(folder), "--caption-column",
                                   "txt", "--precision", "fp32", "--dtype", "float32", "--workers", "1",
                                   "--part-size", "3", "--device", "cpu", "--no-progress"], capsys)
    assert status == 0
    images, meta = layout.read_embeddings(out)
    texts, _ = layout.read_embeddings(out, "text")
    names = meta.column("image_path").to_pylist()
    assert names == [f"{shards}/0.tar/s{i}.jpg" for i in range(3)] + [f"{shards}/1.tar/t0.jpg",
                                                                        f"{shards}/2.tar/s0.jpg"]
    assert meta.column("caption").to_pylist() == ["photo 0", "photo 1", "photo 2", "last photo", "photo 0"]
    assert meta.column("mtime").to_pylist() == [1.7e9] * 5
    exact, _, _ = embed_image_files(model, preprocess, jpeg[:4] + jpeg[:1], num_workers=0)
    assert _cosines(images, exact).min() >= 0.9999 and texts.shape == images.shape
    info = layout.EmbedInfo.read(out)
    assert info.skipped == {"corrupt_shard": 1, "missing_image": 1, "unreadable_image": 1}
    named = {source.rsplit("/", 2)[-2] + "/" + source.rsplit("/", 1)[-1]: reason
             for source, reason, _ in read_skipped_tsv(out / "skipped.tsv")}
    assert named == {"0.tar/bad": "unreadable_image", "0.tar/textonly": "missing_image",
                     f"{shards.name}/2.tar": "corrupt_shard"}


def test_embed_image_files_and_bf16_fallback(tiny, photos, monkeypatch, capsys):
    _, model, preprocess = tiny
    paths = _expected_paths(photos)
    vectors, kept, skips = embed_image_files(model, preprocess, paths, batch_size=7, num_workers=0)
    assert vectors.dtype == np.float32 and len(kept) == len(vectors) == IMAGES
    assert [paths[i] for i in kept] == _good(photos)
    assert {os.path.relpath(s.source, photos): s.reason for s in skips} == BAD
    from clipforge.collection import pipeline

    monkeypatch.setattr(pipeline, "AGREEMENT", 1.01)  # no bf16 result can agree that well: float32 takes over
    fallback, kept16, _ = embed_image_files(model, preprocess, paths, num_workers=0, dtype=torch.bfloat16)
    assert "using float32" in capsys.readouterr().out
    assert kept16 == kept and np.allclose(fallback, vectors, atol=1e-5)


def test_bad_inputs_are_one_sentence(tiny, photos, reference, tmp_path, capsys, monkeypatch):
    folder = str(tiny[0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "table.csv").write_text("image,caption\nx.png,a\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/holiday.jpg").write_text("x")
    cases = {
        "does not exist": [str(tmp_path / "nope"), str(tmp_path / "o1")],
        "holds no image files": [str(tmp_path / "empty"), str(tmp_path / "o2")],
        "--caption-column 'title' is not a column": [str(tmp_path / "table.csv"), str(tmp_path / "o3"),
                                                      "--caption-column", "title"],
        "not both": [str(photos), str(tmp_path / "o4"), "--texts", str(tmp_path / "table.csv")],
        "no input": [str(tmp_path / "o5")],
        "is a file": [str(photos), str(tmp_path / "file")],
        "holds other files": [str(photos), str(tmp_path / "busy")],
        "other settings": [str(photos), str(reference[0]), "--dtype", "float32"],
    }
    for expected, args in cases.items():
        status, _, err = _run_cli([*args, "--model", folder, "--device", "cpu", "--no-progress"], capsys)
        assert status == 2, (expected, err)
        assert err.count("\n") == 1 and err.startswith("clipforge: error:") and expected in err, (expected, err)
    with pytest.raises(ClipforgeError, match="float16 or float32"):
        _embed(tiny, photos, tmp_path / "o6", dtype=torch.bfloat16)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ClipforgeError, match=r"pip install 'clipforge\[search\]'"):
        layout.require_pyarrow()
