"""clipforge index / search / dedup: exact search against brute force, text search against open_clip,
incremental re-indexing, near duplicates, faiss recall, the command line and its one-sentence errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli.main import main
from clipforge.collection import search
from clipforge.collection.index import build_index, load_index
from clipforge.collection.index_exact import exact_search
from clipforge.collection.layout import write_part
from clipforge.errors import ClipforgeError
from clipforge.models.config import config_from_dict
from conftest import TINY_VIT, randomize_

pytest.importorskip("pyarrow")

DUPLICATE_THRESHOLD = 0.99  # planted pairs score > 0.997 with the fixture's model, other pairs < 0.98
TEXTS = ["a red circle", "stripes of blue and green", "noise", "a photo of a dog"]


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by float64 inner product, ties to the lower id (a stable sort of the negated scores)."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def normalised(rows: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_embeddings(folder: Path, vectors: np.ndarray, part_rows: int = 10000) -> Path:
    """A clipforge-embed-style folder (clip-retrieval layout) holding vectors, named x/{i}.jpg."""
    parts = (len(vectors) + part_rows - 1) // part_rows
    for n in range(parts):
        rows = range(n * part_rows, min((n + 1) * part_rows, len(vectors)))
        write_part(folder, n, vectors[rows.start:rows.stop].astype(np.float16),
                   [{"image_path": f"x/{i}.jpg", "caption": f"item {i}"} for i in rows], "img", width=len(str(parts)))
    return folder


# -- exact search -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows, budget", [(2048, 1 << 23), (7, 64)])  # one block; many chunks and merges
def test_exact_search_equals_brute_force(chunk_rows, budget):
    vectors = normalised(500, 32, 0).astype(np.float16)
    queries = normalised(9, 32, 1)
    scores, ids = exact_search(vectors, queries, 10, chunk_rows=chunk_rows, score_budget=budget)
    expected_scores, expected_ids = brute_force(vectors, queries, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (9, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


@pytest.mark.parametrize("chunk_rows, budget", [(2048, 1 << 23), (5, 16), (3, 3)])
def test_exact_search_breaks_ties_by_lower_id_and_caps_k(chunk_rows, budget):
    rng = np.random.default_rng(2)  # entries 0 or +-0.5, four per row: every product is exact, ties everywhere
    vectors = np.zeros((60, 8), np.float32)
    for row in vectors:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    queries = vectors[[0, 5, 17]]
    for k in (1, 7, 60, 100):
        scores, ids = exact_search(vectors.astype(np.float16), queries, k, chunk_rows=chunk_rows, score_budget=budget)
        expected_scores, expected_ids = brute_force(vectors, queries, k)
        assert ids.shape == (3, min(k, 60))
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


def test_index_from_embeddings_folder_searches_like_brute_force(tmp_path):
    vectors = normalised(300, 24, 3)
    index = build_index(write_embeddings(tmp_path / "emb", vectors, part_rows=128), tmp_path / "index")
    assert len(index) == 300 and index.embed_dim == 24 and index.kind == "exact" and index.model_spec is None
    assert isinstance(index.vectors, np.memmap) and index.vectors.dtype == np.float16
    assert index.items.column("image_path")[123].as_py() == "x/123.jpg"
    np.testing.assert_array_equal(index.vector(7), vectors[7].astype(np.float16).astype(np.float32))
    queries = normalised(4, 24, 4)
    scores, ids = index.search(queries, 5)
    np.testing.assert_array_equal(ids, brute_force(index.vectors, queries, 5)[1])
    hits = search.search_embedding(index, queries[0] * 3.0, 5)  # normalised first: scores are cosines
    assert [h.id for h in hits] == ids[0].tolist() and hits[0].path == f"x/{ids[0, 0]}.jpg"
    assert hits[0].caption == f"item {ids[0, 0]}" and abs(hits[0].score - scores[0, 0]) < 1e-6
    like = search.more_like_this(index, 42, 5)
    assert 42 not in [h.id for h in like] and len(like) == 5
    assert [h.id for h in like] == [i for i in brute_force(index.vectors, index.vector(42)[None], 6)[1][0] if i != 42]
    assert search.more_like_this(index, "x/42.jpg", 5) == like


# -- a tiny CLIP model on real image files -----------------------------------------------------------------


def _image(rng: np.random.Generator, kind: int):
    from PIL import Image

    h, w = 36, 44
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if kind == 0:
        t = xx[..., None]
    elif kind == 1:
        t = (np.sin(xx * rng.uniform(5, 30) + yy * rng.uniform(5, 30)) > 0)[..., None] * 1.0
    elif kind == 2:
        t = ((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2 < rng.uniform(0.05, 0.2))[..., None] * 1.0
    else:
        t = rng.uniform(size=(h, w, 1))
    return Image.fromarray((low * (1 - t) + high * t).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A tiny random CLIP saved as an open_clip folder, 20 images, one saved twice and one also as a JPEG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("collection")
    torch.manual_seed(0)
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT)), seed=3).eval()
    with torch.no_grad():  # a random tower sees all images alike; larger weights tell them apart
        generator = torch.Generator().manual_seed(0)
        for parameter in model.visual.parameters():
            if parameter.ndim >= 2:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    clipforge.save(model, root / "model", format="open_clip")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        _image(rng, i % 4).save(images / f"img_{i:02d}.png")
    shutil.copy(images / "img_03.png", images / "img_03_copy.png")
    Image.open(images / "img_05.png").save(images / "img_05_q70.jpg", quality=70)
    index = build_index(images, root / "index", model=root / "model", num_workers=0)
    return {"root": root, "images": images, "model_dir": root / "model", "index": index}


def test_image_folder_index_records_its_model(collection):
    index = collection["index"]
    assert len(index) == 22 and index.embed_dim == TINY_VIT["embed_dim"]
    assert index.model_spec["source"] == str(collection["model_dir"])
    info = json.loads((index.folder / "index.json").read_text())
    assert info["count"] == 22 and info["kind"] == "exact" and info["source"] == str(collection["images"])
    assert info["build"]["embedded"] == 22 and info["version"] == 1
    from clipforge.collection.layout import EmbedInfo, read_embeddings

    stored, table = read_embeddings(index.folder / "embeddings")  # clip-retrieval layout beside the index
    np.testing.assert_array_equal(stored, index.vectors.astype(np.float32))
    assert table.column("image_path").to_pylist() == index.items.column("image_path").to_pylist()
    assert EmbedInfo.read(index.folder / "embeddings").model == str(collection["model_dir"])


def test_index_of_clipforge_embed_output_takes_its_model(collection, tmp_path):
    from clipforge.collection.embed import embed_collection

    index = collection["index"]
    model, preprocess = clipforge.load(collection["model_dir"])
    embed_collection(collection["images"], tmp_path / "emb", model, preprocess, num_workers=0, precision="fp32",
                     progress=False, model_info={"model": str(collection["model_dir"])})
    from_embeddings = build_index(tmp_path / "emb", tmp_path / "index")
    assert from_embeddings.model_spec == index.model_spec and from_embeddings.info["source"] is None
    assert from_embeddings.items.column("image_path").to_pylist() == index.items.column("image_path").to_pylist()
    np.testing.assert_allclose(from_embeddings.vectors.astype(np.float32), index.vectors.astype(np.float32),
                               atol=2e-3)
    assert [h.path for h in search.search_text(from_embeddings, TEXTS[1], 5)] == \
        [h.path for h in search.search_text(index, TEXTS[1], 5)]


def test_text_search_equals_open_clip(collection):
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    index = collection["index"]
    reference, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{collection['model_dir']}")
    reference.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{collection['model_dir']}",
                                        context_length=TINY_VIT["text"]["context_length"])
    paths = index.items.column("image_path").to_pylist()
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        image_features = torch.nn.functional.normalize(reference.encode_image(images), dim=-1)
        text_features = torch.nn.functional.normalize(reference.encode_text(tokenizer(TEXTS)), dim=-1)
    expected = (text_features @ image_features.T).double().numpy()
    found = search.search_text(index, TEXTS, 5)
    assert len(found) == len(TEXTS)
    assert [h.id for h in search.search_text(index, TEXTS[0], 5)] == [h.id for h in found[0]]  # one text: one list
    strict = 0
    for hits, truth in zip(found, expected):
        order = np.argsort(-truth, kind="stable")
        assert len(hits) == 5
        for rank, hit in enumerate(hits):
            assert abs(hit.score - truth[hit.id]) < 5e-4  # float16 storage
            assert abs(truth[hit.id] - truth[order[rank]]) < 5e-4  # same rank, up to float16 ties
        if (-np.diff(truth[order[:6]]) > 1e-3).all():  # no near-ties: the very same ids in the same order
            assert [h.id for h in hits] == order[:5].tolist()
            strict += 1
    assert strict >= 2


def test_image_query_equals_more_like_this(collection):
    index = collection["index"]
    item = index.id_of(str(collection["images"] / "img_10.png"))
    by_image = search.search_image(index, collection["images"] / "img_10.png", 6)
    assert by_image[0].id == item and by_image[0].score > 0.999
    like = search.more_like_this(index, item, 5)
    assert [h.id for h in like] == [h.id for h in by_image[1:]]
    np.testing.assert_allclose([h.score for h in like], [h.score for h in by_image[1:]], atol=2e-3)
    from PIL import Image

    as_pil = search.search_image(index, [Image.open(collection["images"] / "img_10.png")], 6)
    assert [h.id for h in as_pil[0]] == [h.id for h in by_image]


def test_near_duplicates_are_the_planted_pairs(collection):
    index = collection["index"]
    name = {i: os.path.basename(p) for i, p in enumerate(index.items.column("image_path").to_pylist())}
    pairs = search.near_duplicates(index, DUPLICATE_THRESHOLD)
    assert {(name[p.i], name[p.j]) for p in pairs} == {("img_03.png", "img_03_copy.png"),
                                                       ("img_05.png", "img_05_q70.jpg")}
    assert all(p.i < p.j for p in pairs) and pairs[0].score >= pairs[1].score
    chunked = search.near_duplicates(index, DUPLICATE_THRESHOLD, chunk=3)  # chunking does not change the answer
    assert [(p.i, p.j) for p in chunked] == [(p.i, p.j) for p in pairs]
    np.testing.assert_allclose([p.score for p in chunked], [p.score for p in pairs], atol=1e-6)
    loose = search.near_duplicates(index, 0.9, k=3)
    assert len(loose) == len({(p.i, p.j) for p in loose}) > len(pairs)


def test_incremental_reindex_embeds_only_new_and_changed_files(collection, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(collection["images"], images)
    model = collection["model_dir"]
    first = build_index(images, tmp_path / "index", model=model, num_workers=0)
    assert first.info["build"]["embedded"] == 22
    stat = os.stat(images / "img_07.png")
    os.utime(images / "img_07.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
    shutil.copy(collection["images"] / "img_12.png", images / "new.png")  # added
    (images / "img_15.png").unlink()  # deleted
    again = build_index(images, tmp_path / "index", model=model, num_workers=0)
    assert {k: again.info["build"][k] for k in ("embedded", "reused", "removed")} == \
        {"embedded": 2, "reused": 20, "removed": 1}
    full = build_index(images, tmp_path / "full", model=model, num_workers=0, incremental=False)
    assert full.info["build"]["embedded"] == 22
    assert again.items.to_pydict() == full.items.to_pydict()
    np.testing.assert_allclose(again.vectors.astype(np.float32), full.vectors.astype(np.float32), atol=2e-3)
    for query in TEXTS:
        assert [h.path for h in search.search_text(again, query, 22)] == \
            [h.path for h in search.search_text(full, query, 22)]
    unchanged = build_index(images, tmp_path / "index", model=model, num_workers=0)
    assert unchanged.info["build"]["embedded"] == 0 and unchanged.info["build"]["reused"] == 22


def test_failed_build_leaves_the_previous_index(collection, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    shutil.copytree(collection["index"].folder, index_dir)
    import clipforge.collection.index_build as index_build

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_build, "_fsync_tree", broken)
    with pytest.raises(ClipforgeError, match="no space left"):
        build_index(collection["images"], index_dir, model=collection["model_dir"], num_workers=0, incremental=False)
    assert len(load_index(index_dir)) == 22
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the temporary folder is gone


# -- approximate indexes -------------------------------------------------------------------------------------


def clustered(count: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = normalised(clusters, dim, seed + 1)
    v = centers[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, dim)) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_embeddings(tmp_path_factory):
    return write_embeddings(tmp_path_factory.mktemp("clustered") / "emb", clustered(20000, 64, 200))


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_index_recall(kind, clustered_embeddings, tmp_path):
    pytest.importorskip("faiss")
    index = build_index(clustered_embeddings, tmp_path / kind, kind=kind)
    assert (index.folder / "faiss.index").is_file() and index.kind == kind
    assert index.recall_at(10, 300) >= 0.9
    queries = np.asarray(index.vectors[:5], dtype=np.float32)
    scores, ids = load_index(index.folder).search(queries, 10)  # reopened: faiss.index read back
    exact_scores, exact_ids = index.search(queries, 10, exact=True)
    assert (ids[:, 0] == np.arange(5)).all()
    np.testing.assert_allclose(scores[:, :3], exact_scores[:, :3], atol=1e-6)  # candidates rescored exactly
    if kind == "ivfpq":
        assert index.info["faiss"]["nlist"] == 20000 // 39 and 64 % index.info["faiss"]["pq_m"] == 0
        assert index.recall_at(10, 100, nprobe=1) <= index.recall_at(10, 100, nprobe=64)


def test_ivfpq_needs_enough_vectors(tmp_path):
    pytest.importorskip("faiss")
    with pytest.raises(ClipforgeError, match="at least 1000 vectors"):
        build_index(write_embeddings(tmp_path / "emb", normalised(50, 16, 0)), tmp_path / "index", kind="ivfpq")


# -- command line -------------------------------------------------------------------------------------------


def _table_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line[:1].isdigit()]


def test_cli_index_search_and_dedup(collection, tmp_path, capsys):
    index_dir = tmp_path / "index"
    assert main(["index", str(collection["images"]), str(index_dir), "--model", str(collection["model_dir"]),
                 "--workers", "0", "--threads", "1"]) == 0
    assert "indexed 22 items" in capsys.readouterr().out
    index = load_index(index_dir)

    assert main(["search", str(index_dir), "--text", TEXTS[0], "-k", "4"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    expected = search.search_text(index, TEXTS[0], 4)
    assert [int(r[2]) for r in rows] == [h.id for h in expected] and [r[3] for r in rows] == [h.path for h in expected]

    assert main(["search", str(index_dir), "--text", TEXTS[0], "-k", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["query"] == {"text": TEXTS[0]} and [r["rank"] for r in data["results"]] == [1, 2, 3, 4]
    assert [r["id"] for r in data["results"]] == [h.id for h in expected]

    image = collection["images"] / "img_10.png"
    assert main(["search", str(index_dir), "--like", str(image), "--json", "-k", "3"]) == 0
    like = json.loads(capsys.readouterr().out)["results"]
    assert [r["id"] for r in like] == [h.id for h in search.more_like_this(index, index.id_of(str(image)), 3)]
    assert main(["search", str(index_dir), "--like", str(index.id_of(str(image))), "--json", "-k", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == like

    np.save(tmp_path / "query.npy", index.vector(10)[None])  # [1, E] works too
    assert main(["search", str(index_dir), "--embedding", str(tmp_path / "query.npy"), "--json", "-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == 10

    assert main(["dedup", str(index_dir), "--threshold", str(DUPLICATE_THRESHOLD), "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)["pairs"]
    assert sorted((os.path.basename(p["path_i"]), os.path.basename(p["path_j"])) for p in pairs) == \
        [("img_03.png", "img_03_copy.png"), ("img_05.png", "img_05_q70.jpg")]
    assert main(["dedup", str(index_dir), "--threshold", str(DUPLICATE_THRESHOLD)]) == 0
    out = capsys.readouterr().out
    assert "img_03_copy.png" in out and "2 near-duplicate pairs" in out


@pytest.fixture
def small_index(tmp_path):
    return build_index(write_embeddings(tmp_path / "emb", normalised(30, 16, 5)), tmp_path / "index")


def _damage(folder: Path, how: str) -> None:
    if how == "no index.json":
        (folder / "index.json").unlink()
    elif how == "bad json":
        (folder / "index.json").write_text("{not json")
    elif how == "count":
        info = json.loads((folder / "index.json").read_text())
        (folder / "index.json").write_text(json.dumps({**info, "count": 31}))
    elif how == "vectors":
        np.save(folder / "vectors.npy", np.zeros((29, 16), np.float16))
    elif how == "items":
        (folder / "items.parquet").write_bytes(b"PAR1 broken")


@pytest.mark.parametrize("how, message", [("no index.json", "is not a clipforge index"),
                                          ("bad json", "is damaged"), ("count", "counts 31 items"),
                                          ("vectors", "holds 29 vectors"), ("items", "items.parquet cannot be read")])
def test_damaged_index_is_one_sentence(small_index, how, message, capsys):
    _damage(small_index.folder, how)
    with pytest.raises(ClipforgeError, match=message):
        load_index(small_index.folder)
    assert main(["search", str(small_index.folder), "--like", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("clipforge: error: ")


@pytest.mark.parametrize("argv, message", [
    (["search", "{missing}", "--like", "0"], "does not exist"),
    (["search", "{index}", "--embedding", "{wrong_dim}"], "do not fit index"),
    (["search", "{index}", "--like", "0", "-k", "0"], "must be a positive whole number"),
    (["search", "{index}", "--text", "  "], "--text is empty"),
    (["search", "{index}", "--text", "a dog"], "records no model"),
    (["search", "{index}", "--like", "nowhere.jpg"], "neither an item id nor an image path"),
    (["search", "{index}", "--like", "30"], "ids are whole numbers from 0 to 29"),
    (["search", "{index}", "--embedding", "{missing}"], "does not exist"),
    (["dedup", "{index}", "--threshold", "2"], "between -1 and 1"),
    (["index", "{missing}", "{new}"], "does not exist"),
    (["index", "{emb_parent}", "{new}"], "needs a model"),
    (["index", "{emb}", "{emb_parent}"], "is the source"),
])
def test_cli_bad_inputs_are_one_sentence(small_index, tmp_path, argv, message, capsys):
    np.save(tmp_path / "wrong.npy", np.ones(15, np.float32))
    (tmp_path / "pictures").mkdir()
    _image(np.random.default_rng(0), 0).save(tmp_path / "pictures" / "a.png")
    names = {"missing": tmp_path / "missing", "index": small_index.folder, "wrong_dim": tmp_path / "wrong.npy",
             "new": tmp_path / "new", "emb": tmp_path / "emb", "emb_parent": tmp_path / "pictures"}
    if argv[1] == "{emb}":
        names["emb_parent"] = tmp_path
    assert main([arg.format(**names) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("clipforge: error: ")


def test_api_refuses_bad_queries(small_index):
    with pytest.raises(ClipforgeError, match="k must be a whole number"):
        small_index.search(np.ones((1, 16), np.float32), 0)
    with pytest.raises(ClipforgeError, match="do not fit index"):
        search.search_embedding(small_index, np.ones(8, np.float32))
    with pytest.raises(ClipforgeError, match="all zeros"):
        search.search_embedding(small_index, np.zeros(16, np.float32))
    with pytest.raises(ClipforgeError, match="NaN"):
        small_index.search(np.full((1, 16), np.nan, np.float32), 3)
    with pytest.raises(ClipforgeError, match="is empty"):
        search.encode_text_queries(None, [""])  # checked before the model is touched
    with pytest.raises(ClipforgeError, match="threshold"):
        search.near_duplicates(small_index, 1.5)
    scores, ids = small_index.search(np.ones(16, np.float32), 100)
    assert ids.shape == (1, 30) and sorted(ids[0].tolist()) == list(range(30))
