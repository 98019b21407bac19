"""clipforge.data: CSV, synthetic and WebDataset sources behind build_train_data; bad samples; exact resume."""

from __future__ import annotations

import functools
import http.server
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import (
    EVAL_OFFSET,
    Batch,
    DataConfig,
    SyntheticCaptions,
    build_train_data,
    eval_pairs,
    synthetic_pair,
)
from clipforge.data.make_shards import csv_to_shards, write_shards
from clipforge.data.make_shards import main as make_shards_main
from clipforge.data.synthetic import COLOURS
from clipforge.data.webdataset_source import expand_shards
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.tokenizer import decode_batch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
SIZE, CONTEXT = 16, 16
BAD_ROWS = {3: "missing_file", 7: "unreadable_image", 11: "empty_caption", 15: "bad_utf8"}


def write_images(folder: Path, count: int) -> list[str]:
    """Tiny non-square images (so the random crop matters), distinct pixels each."""
    names = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 26, 3), dtype=np.uint8)
        name = f"img_{i:02d}.{'png' if i % 5 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def write_csv(folder: Path, count: int = 20, bad: bool = True) -> Path:
    """A CSV of ``count`` rows; with ``bad``, the rows of BAD_ROWS are broken in four different ways."""
    lines = [b"filepath,title"]
    for i, name in enumerate(write_images(folder, count)):
        caption, problem = f"photo number {i}".encode(), BAD_ROWS.get(i) if bad else None
        if problem == "missing_file":
            (folder / name).unlink()
        elif problem == "unreadable_image":  # a JPEG cut in half
            (folder / name).write_bytes((folder / name).read_bytes()[:300])
        elif problem:
            caption = b"   " if problem == "empty_caption" else b"caf\xe9 \xff photo"  # Latin-1: not UTF-8
        lines.append(name.encode() + b"," + caption)
    (folder / "train.csv").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "train.csv"


def run(config: dict, epoch: int = 0, start_step: int = 0, **kw) -> list[Batch]:
    options = {"image_size": SIZE, "context_length": CONTEXT, "global_batch_size": 4, **kw}
    data = build_train_data(DataConfig.from_dict(config), **options)
    return list(data.batches(epoch, start_step))


def squash(text: str) -> str:
    """Decoded BPE spaces digits and punctuation apart; compare texts without spaces."""
    return text.replace(" ", "")


def captions(batches: list[Batch]) -> list[str]:
    return [squash(text) for b in batches for text in decode_batch(b.texts)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.texts, y.texts) and x.skipped == y.skipped


def total_skips(batches: list[Batch]) -> dict[str, int]:
    return dict(sum((Counter(b.skipped) for b in batches), Counter()))


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path)


# ---- CSV: bad samples ----------------------------------------------------------------------------------------


def test_csv_bad_samples_are_dropped_never_repeated_and_counted(bad_csv: Path) -> None:
    batches = run({"type": "csv", "path": str(bad_csv), "num_workers": 0})
    # Rows bad on paper (missing file, empty or non-UTF-8 caption) leave before the epoch is drawn:
    # 17 usable rows // 4 = 4 steps; the image that fails to decode leaves its batch one short.
    assert len(batches) == 4
    assert sorted(len(batch) for batch in batches) == [3, 4, 4, 4]
    for batch in batches:
        assert batch.images.shape == (len(batch), 3, SIZE, SIZE) and batch.images.dtype == torch.float32
        assert batch.texts.shape == (len(batch), CONTEXT)
    assert total_skips(batches) == {reason: 1 for reason in BAD_ROWS.values()}  # each bad row once
    texts = captions(batches)
    assert len(texts) == len(set(texts))  # no sample twice: no false negatives for the contrastive loss
    good = {squash(f"photo number {i}") for i in range(20) if i not in BAD_ROWS}
    assert set(texts) <= good and len(texts) == 15


def test_unusable_data_raises(tmp_path: Path) -> None:
    (tmp_path / "all_bad.csv").write_text("filepath,title\n" + "".join(f"nope{i}.jpg,a cat\n" for i in range(8)))
    with pytest.raises(ClipforgeError, match="unusable"):
        run({"type": "csv", "path": str(tmp_path / "all_bad.csv"), "num_workers": 0})


def test_tsv_and_relative_paths(tmp_path: Path) -> None:
    names = write_images(tmp_path, 8)
    (tmp_path / "sub").mkdir()
    lines = ["caption\timage"] + [f"a \"quoted\" photo, {i}\t../{name}" for i, name in enumerate(names)]
    (tmp_path / "sub" / "t.tsv").write_text("\n".join(lines) + "\n")
    batches = run({"type": "csv", "path": str(tmp_path / "sub" / "t.tsv"), "image_column": "image",
                   "caption_column": "caption", "num_workers": 0})
    assert len(batches) == 2 and total_skips(batches) == {}
    assert sorted(captions(batches)) == sorted(squash(f'a "quoted" photo, {i}') for i in range(8))


# ---- determinism and exact resume ----------------------------------------------------------------------------


def test_same_seed_same_batches_and_epochs_differ(bad_csv: Path) -> None:
    config = {"type": "csv", "path": str(bad_csv), "num_workers": 0}
    assert_same(run(config, seed=3), run(config, seed=3))
    assert captions(run(config, seed=3)) != captions(run(config, seed=4))
    assert captions(run(config, epoch=1)) != captions(run(config, epoch=0))


def test_start_step_resumes_exactly(bad_csv: Path) -> None:
    config = {"type": "csv", "path": str(bad_csv), "num_workers": 0}
    full = run(config, epoch=2)
    assert_same(run(config, epoch=2, start_step=3), full[3:])
    assert run(config, epoch=2, start_step=5) == []


def test_ranks_concatenate_to_the_single_process_batch(bad_csv: Path) -> None:
    config = {"type": "csv", "path": str(bad_csv), "num_workers": 0}
    whole = run(config, epoch=1)
    ranks = [run(config, epoch=1, rank=r, world_size=2) for r in range(2)]
    for step, batch in enumerate(whole):
        parts = [ranks[0][step], ranks[1][step]]
        # Each rank holds its half of the step's slots; a slot whose image fails to decode is dropped
        # (under torch.distributed every rank is then cut to the smallest size, tested in test_data_skips).
        assert sum(p.images.shape[0] for p in parts) == batch.images.shape[0]
        assert torch.equal(torch.cat([p.images for p in parts]), batch.images)  # bitwise: crops included
        assert torch.equal(torch.cat([p.texts for p in parts]), batch.texts)
    assert total_skips(ranks[0] + ranks[1]) == total_skips(whole)


def test_two_workers_match_no_workers(bad_csv: Path) -> None:
    config = {"type": "csv", "path": str(bad_csv)}
    rng_state = torch.get_rng_state()
    assert_same(run({**config, "num_workers": 2}), run({**config, "num_workers": 0}))
    assert torch.equal(torch.get_rng_state(), rng_state)  # loading data leaves the training RNG alone


# ---- synthetic -----------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_batches() -> None:
    image, caption = synthetic_pair(0, 5)
    again, caption_again = synthetic_pair(0, 5)
    assert caption == caption_again and np.array_equal(np.asarray(image), np.asarray(again))
    assert synthetic_pair(1, 5)[1] != caption or not np.array_equal(np.asarray(synthetic_pair(1, 5)[0]),
                                                                     np.asarray(image))
    config = {"type": "synthetic", "num_samples": 12, "num_workers": 0}
    batches = run(config, global_batch_size=4)
    assert len(batches) == 3 and total_skips(batches) == {}
    assert_same(batches, run(config, global_batch_size=4))


def _near(image: Image.Image, rgb: tuple[int, int, int]) -> np.ndarray:
    pixels = np.asarray(image).astype(np.int32)
    return np.linalg.norm(pixels - np.asarray(rgb), axis=-1) < 45


def test_synthetic_captions_describe_the_pixels() -> None:
    checked = 0
    for index in range(60):
        image, caption = synthetic_pair(7, index)
        named = [c for c in COLOURS if f" {c} " in caption]
        assert named and any(s in caption for s in ("circle", "square", "triangle", "star"))
        for colour in COLOURS:
            present = _near(image, COLOURS[colour]).sum()
            assert (present >= 10) if colour in named else (present < 3), (caption, colour, present)
        if " and " not in caption and caption.endswith(("on the left", "on the right")):
            _, xs = np.nonzero(_near(image, COLOURS[named[0]]))
            assert (xs.mean() < 32) == caption.endswith("on the left"), caption
            checked += 1
    assert checked >= 5


def test_synthetic_eval_split_is_disjoint() -> None:
    images, texts = eval_pairs(0, 3)
    for i in range(3):
        image, caption = synthetic_pair(0, EVAL_OFFSET + i)
        assert texts[i] == caption and np.array_equal(np.asarray(images[i]), np.asarray(image))
    held_out = SyntheticCaptions(0, 3, split="eval")
    assert held_out[0][1] == texts[0]
    assert SyntheticCaptions(0, 3)[0][1] == synthetic_pair(0, 0)[1]
    with pytest.raises(ConfigError, match="data.num_samples"):
        DataConfig(type="synthetic", num_samples=EVAL_OFFSET + 1)


# ---- WebDataset ----------------------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """16 clean samples in 4 shards of 4."""
    paths = csv_to_shards(write_csv(tmp_path, 16, bad=False), tmp_path / "shards", samples_per_shard=4)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    return tmp_path / "shards"


def wds_config(folder: Path, **kw) -> dict:
    return {"type": "webdataset", "path": str(folder / "{00000..00003}.tar"), "num_samples": 16,
            "num_workers": 0, **kw}


def test_make_shards_layout_and_skips(bad_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = write_shards(bad_csv, tmp_path / "out", samples_per_shard=6)
    assert summary.samples == 16 and len(summary.paths) == 3
    assert summary.skipped == {reason: 1 for reason in BAD_ROWS.values()}
    with tarfile.open(summary.paths[0]) as tar:
        names = tar.getnames()
    assert {"000000000.png", "000000000.txt", "000000000.json"} <= set(names)  # img2dataset layout
    assert "000000001.jpg" in names
    assert make_shards_main([str(bad_csv), str(tmp_path / "out2"), "--samples-per-shard", "8"]) == 0
    out = capsys.readouterr().out
    assert "wrote 16 samples in 2 shard(s)" in out and "skipped 4 rows" in out and "{00000..00001}" in out


def test_webdataset_every_sample_once_across_ranks_and_workers(shards: Path) -> None:
    seen = []
    for rank in range(2):
        batches = run(wds_config(shards, num_workers=2), rank=rank, world_size=2)
        assert len(batches) == 4 and all(b.images.shape == (2, 3, SIZE, SIZE) for b in batches)
        seen += captions(batches)
    assert sorted(seen) == sorted(squash(f"photo number {i}") for i in range(16))


def test_webdataset_deterministic_and_resumes(shards: Path) -> None:
    full = run(wds_config(shards), epoch=1)
    assert len(full) == 4 and sorted(captions(full)) == sorted(squash(f"photo number {i}") for i in range(16))
    assert_same(full, run(wds_config(shards), epoch=1))
    assert_same(run(wds_config(shards), epoch=1, start_step=2), full[2:])
    assert captions(run(wds_config(shards), epoch=2)) != captions(full)


def test_webdataset_truncated_shard_is_counted(shards: Path) -> None:
    shard = shards / "00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="00001.tar"):
        batches = run(wds_config(shards, num_samples=24))  # more than the data: a second pass
    assert len(batches) == 6 and all(b.images.shape[0] == 4 for b in batches)
    assert total_skips(batches).get("corrupt_shard", 0) >= 1


def test_webdataset_patterns(shards: Path) -> None:
    assert expand_shards("a/{00000..00002}.tar") == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert expand_shards("x/{a,b}.tar, y.tar::https://h/z-{0..1}.tar") == [
        "x/a.tar", "x/b.tar", "y.tar", "https://h/z-0.tar", "https://h/z-1.tar"]
    listed = ",".join(str(shards / f"0000{i}.tar") for i in range(4))
    assert len(run({**wds_config(shards), "path": listed})) == 4
    with pytest.raises(ClipforgeError, match="none of the"):
        run({**wds_config(shards), "path": str(shards / "missing-{0..3}.tar")})


def test_webdataset_over_http(shards: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed; webdataset opens http(s) shards with curl")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00003}}.tar"
        batches = run({**wds_config(shards), "path": url})
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(captions(batches)) == sorted(squash(f"photo number {i}") for i in range(16))


# ---- configuration errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, field", [
    ({"type": "parquet"}, "data.type"),
    ({"path": "x.csv"}, "data.type"),
    ({"type": "csv"}, "data.path"),
    ({"type": "webdataset", "path": "s/{0..3}.tar"}, "data.num_samples"),
    ({"type": "synthetic", "num_workers": -1}, "data.num_workers"),
    ({"type": "synthetic", "num_samples": "many"}, "data.num_samples"),
    ({"type": "csv", "path": "a.csv", "separator": "::"}, "data.separator"),
    ({"type": "synthetic", "bogus": 1}, "data.bogus"),
])
def test_bad_config_names_the_field(config: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DataConfig.from_dict(config)


def test_bad_batch_split_and_columns(bad_csv: Path) -> None:
    with pytest.raises(ConfigError, match="global_batch_size"):
        run({"type": "synthetic", "num_samples": 30}, global_batch_size=10, world_size=3)
    with pytest.raises(ConfigError, match=r"data.caption_column 'caption'.*'filepath', 'title'"):
        run({"type": "csv", "path": str(bad_csv), "caption_column": "caption"})
    with pytest.raises(ClipforgeError, match="does not exist"):
        run({"type": "csv", "path": str(bad_csv.parent / "nope.csv")})
    assert DataConfig.from_dict({"type": "csv", "path": "a.tsv", "separator": "\\t"}).separator == "\t"


# ---- real data -----------------------------------------------------------------------------------------------


def test_flickr8k_tsv_reads_real_batches(tmp_path: Path) -> None:
    table = SHARED_DATA / "flickr8k" / "captions.tsv"
    if not table.is_file():
        pytest.skip(f"Flickr8k not found at {table}; the shared data folder is absent")
    rows, seen = [], set()
    for line in table.read_text(encoding="utf-8").splitlines()[1:]:
        image, caption = line.split("\t")[:2]
        if image not in seen:
            seen.add(image)
            rows.append(f"{SHARED_DATA / 'flickr8k' / 'images' / image}\t{caption}")
        if len(rows) == 64:
            break
    (tmp_path / "flickr.tsv").write_text("image\tcaption\n" + "\n".join(rows) + "\n", encoding="utf-8")
    config = {"type": "csv", "path": str(tmp_path / "flickr.tsv"), "image_column": "image",
              "caption_column": "caption", "num_workers": 0}
    batches = run(config, image_size=64, context_length=77, global_batch_size=16)
    assert len(batches) == 4 and total_skips(batches) == {}
    for batch in batches:
        assert batch.images.shape == (16, 3, 64, 64) and torch.isfinite(batch.images).all()
        assert batch.images.std() > 0.1  # real photos, not blank
    assert len(set(captions(batches))) == 64


def test_image_root_and_split_filter(tmp_path: Path) -> None:
    """Flickr8k's layout: names relative to an images/ folder and a split column; only train rows are read."""
    (tmp_path / "images").mkdir()
    names = write_images(tmp_path / "images", 12)
    rows = ["image\tcaption\tsplit"] + [f"{name}\tphoto {i}\t{'train' if i < 8 else 'test'}"
                                        for i, name in enumerate(names)]
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    config = {"type": "csv", "path": str(tmp_path / "captions.tsv"), "image_column": "image",
              "caption_column": "caption", "image_root": str(tmp_path / "images"), "split": "train",
              "num_workers": 0}
    batches = run(config)
    assert total_skips(batches) == {} and sorted(captions(batches)) == sorted(squash(f"photo {i}") for i in range(8))
    with pytest.raises(ClipforgeError, match="matches no row"):
        run({**config, "split": "validation"})
    with pytest.raises(ClipforgeError, match="image_root"):
        run({**config, "image_root": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="data.resize_ratio"):
        DataConfig.from_dict({**config, "resize_ratio": 0.5})


def test_resize_ratio_gives_square_images_a_random_crop() -> None:
    """The paper's random square crop does nothing to a square image unless it is resized larger first."""
    from clipforge.transforms import image_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    plain = image_transform(64, train=True)
    assert all(torch.equal(plain(image), plain(image)) for _ in range(3))  # nothing random to do
    ratio = image_transform(64, train=True, resize_ratio=1.25, generator=torch.Generator().manual_seed(0))
    crops = [ratio(image) for _ in range(4)]
    assert crops[0].shape == (3, 64, 64) and any(not torch.equal(crops[0], c) for c in crops[1:])
    assert torch.equal(image_transform(64)(image), image_transform(64, resize_ratio=1.25)(image))  # eval unchanged
