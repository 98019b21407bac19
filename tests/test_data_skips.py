"""Bad training data: dropped, never repeated; each bad sample counted once per epoch and named, the same in
train (CSV and WebDataset), make-shards and a resumed run. All data is generated here, tiny."""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import (
    BAD_UTF8,
    CORRUPT_SHARD,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_FILE,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    Batch,
    DataConfig,
    SkipLedger,
    SkipRecord,
    build_train_data,
    read_skipped_tsv,
    write_skipped_tsv,
)
from clipforge.data.make_shards import main as make_shards_main
from clipforge.data.make_shards import write_shards
from clipforge.errors import ClipforgeError
from clipforge.tokenizer import decode_batch

SIZE, CONTEXT, BATCH = 16, 16, 8
SHARED_FLICKR = Path(__file__).resolve().parents[2] / "shared/data/flickr8k"
INJECTED = {MISSING_FILE: 3, UNREADABLE_IMAGE: 3, EMPTY_CAPTION: 3, BAD_UTF8: 3}


def save_image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 15, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def bad_table(folder: Path, good: int = 40) -> tuple[Path, dict[str, str]]:
    """``good`` usable rows and 12 bad ones (3 of each INJECTED kind) in a shuffled order.

    Returns the CSV and {source: reason} of the bad rows, sources named as training names them.
    """
    kinds = ["good"] * good + [k for k, n in INJECTED.items() for _ in range(n)]
    random.Random(7).shuffle(kinds)
    broken_files = iter(["cut", "garbage", "folder"])  # three ways for an image file to be unreadable
    lines, expected = [b"filepath,title"], {}
    for i, kind in enumerate(kinds):
        name, caption = f"img_{i:02d}.{'png' if i % 3 == 0 else 'jpg'}", f"photo number {i}".encode()
        save_image(folder / name, i)
        if kind == MISSING_FILE:
            (folder / name).unlink()
        elif kind == UNREADABLE_IMAGE:
            how = next(broken_files)
            if how == "cut":
                (folder / name).write_bytes((folder / name).read_bytes()[:60])
            elif how == "garbage":
                (folder / name).write_bytes(b"this is not an image at all" * 4)
            else:
                (folder / name).unlink()
                (folder / name).mkdir()
        elif kind == EMPTY_CAPTION:
            caption = b"  "
        elif kind == BAD_UTF8:
            caption = b"caf\xe9 \xff photo"
        lines.append(name.encode() + b"," + caption)
        if kind != "good":
            expected[f"{os.path.abspath(folder / 'train.csv')}:{i + 2}"] = kind  # header is line 1
    (folder / "train.csv").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "train.csv", expected


def texts(batch: Batch) -> list[str]:
    return [t.replace(" ", "") for t in decode_batch(batch.texts)]


def build(config: dict, **kw):
    options = {"image_size": SIZE, "context_length": CONTEXT, "global_batch_size": BATCH, **kw}
    return build_train_data(DataConfig.from_dict(config), **options)


def assert_distinct(batches: list[Batch]) -> None:
    for batch in batches:
        assert len(set(texts(batch))) == len(batch), texts(batch)
    seen = [t for b in batches for t in texts(b)]
    assert len(seen) == len(set(seen))  # and no sample twice in the epoch


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return bad_table(tmp_path_factory.mktemp("csv"))


def test_csv_batches_distinct_and_each_bad_row_counted_once_per_epoch(table) -> None:
    path, expected = table
    data = build({"type": "csv", "path": str(path), "num_workers": 2})
    ledger = SkipLedger()
    for epoch in range(2):
        batches = list(data.batches(epoch))
        assert len(batches) == data.steps_per_epoch == (40 + 2) // BATCH  # 2 decode-time bad rows still in order
        assert all(len(b) <= BATCH and b.images.shape[1:] == (3, SIZE, SIZE) for b in batches)
        assert_distinct(batches)
        records = [r for b in batches for r in b.skips]
        assert {r.source: r.reason for r in records} == expected and len(records) == 12  # once, without dedup
        assert all(r.epoch == epoch for r in records)
        assert 40 - 2 <= sum(len(b) for b in batches) <= 40  # only the 2 decode-time bad rows can cost a slot
        assert ledger.add(records) == INJECTED
        assert ledger.epoch_counts(epoch) == INJECTED
    assert ledger.counts() == {reason: 2 * n for reason, n in INJECTED.items()}
    assert {r.source: r.reason for r in ledger.records()} == expected


def test_resume_replays_exactly_and_ledger_survives_a_checkpoint(table, tmp_path: Path) -> None:
    path, expected = table
    data = build({"type": "csv", "path": str(path), "num_workers": 0})
    full = list(data.batches(0))
    ledger = SkipLedger()
    ledger.add(r for b in full[:3] for r in b.skips)
    torch.save({"skips": ledger.state_dict()}, tmp_path / "ckpt.pt")
    restored = SkipLedger()
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["skips"])
    assert restored.counts() == ledger.counts() and restored.records() == ledger.records()
    resumed = list(data.batches(0, start_step=2))  # the run died after step 3; its checkpoint was at step 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts) and a.skips == b.skips
    restored.add(r for b in resumed for r in b.skips)  # step 2 is reported again: not counted again
    assert restored.epoch_counts(0) == INJECTED and restored.counts() == INJECTED
    restored.add(r for b in data.batches(1) for r in b.skips)
    assert restored.counts() == {reason: 2 * n for reason, n in INJECTED.items()}


def test_ranks_agree_on_batch_size_without_repeating(table) -> None:
    """Two ranks: each drops its own bad samples, then both cut to the smaller size (all_reduce MIN in DDP)."""
    path, expected = table
    ranks = [build({"type": "csv", "path": str(path), "num_workers": 0}, rank=r, world_size=2) for r in range(2)]
    alone = [list(r.batches(0)) for r in ranks]
    sizes = [min(len(a), len(b)) for a, b in zip(*alone)]
    agreed = iter(sizes * 2)
    for data in ranks:  # what min_across_ranks returns under torch.distributed
        data.agree = lambda n: next(agreed)
    both = [list(r.batches(0)) for r in ranks]
    for step, (a, b) in enumerate(zip(*both)):
        assert len(a) == len(b) == sizes[step]
        assert a.unused + len(a) == len(alone[0][step]) and b.unused + len(b) == len(alone[1][step])
    assert_distinct(both[0] + both[1])
    records = [r for batches in both for b in batches for r in b.skips]
    assert {r.source: r.reason for r in records} == expected and len(records) == 12


def test_all_bad_step_is_empty_not_refilled(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(b"garbage")
    (tmp_path / "t.csv").write_text("filepath,title\n" + "".join(f"{i}.jpg,cat {i}\n" for i in range(8)))
    batches = list(build({"type": "csv", "path": str(tmp_path / "t.csv"), "num_workers": 0}, global_batch_size=4)
                   .batches(0))
    assert [len(b) for b in batches] == [0, 0] and sum(b.skipped[UNREADABLE_IMAGE] for b in batches) == 8
    (tmp_path / "u.csv").write_text("filepath,title\n" + "".join(f"no{i}.jpg,cat\n" for i in range(8)))
    with pytest.raises(ClipforgeError, match=r"unusable.*missing_file=8"):
        build({"type": "csv", "path": str(tmp_path / "u.csv")})


def test_make_shards_names_the_same_rows_and_its_shards_train_clean(table, tmp_path: Path, capsys) -> None:
    path, expected = table
    out = tmp_path / "shards"
    assert make_shards_main([str(path), str(out), "--samples-per-shard", "16"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 40 samples in 3 shard(s)" in printed
    assert "skipped 12 rows (of 52): bad_utf8=3, empty_caption=3, missing_file=3, unreadable_image=3" in printed
    assert f"each listed in {out / 'skipped.tsv'}" in printed
    listed = read_skipped_tsv(out / "skipped.tsv")
    assert {source: reason for source, reason, _ in listed} == expected and len(listed) == 12
    data = build({"type": "webdataset", "path": str(out / "{00000..00002}.tar"), "num_samples": 40,
                  "num_workers": 2})
    batches = list(data.batches(0))
    assert len(batches) == 5 and all(len(b) == BATCH and not b.skips for b in batches)
    assert sorted(t for b in batches for t in texts(b)) == sorted(
        f"photonumber{int(source.rsplit(':', 1)[1]) - 2}" for source in _good_sources(path, expected))


def _good_sources(path: Path, bad: dict[str, str]) -> list[str]:
    lines = len(path.read_bytes().splitlines())
    return [s for s in (f"{os.path.abspath(path)}:{n}" for n in range(2, lines + 1)) if s not in bad]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_bad_shards_and_members_counted_once_and_named(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("filepath,title\n" + "".join(f"{i}.png,clean photo {i}\n" for i in range(24)))
    for i in range(24):
        save_image(tmp_path / f"{i}.png", 100 + i)
    out = tmp_path / "shards"
    assert write_shards(tmp_path / "t.csv", out, samples_per_shard=8).skipped == {}
    cut = out / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 700])  # cut inside a member
    png = io.BytesIO()
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8) + 9).save(png, format="PNG")
    with tarfile.open(out / "00003.tar", "w") as tar:
        for key in ("a", "b", "c", "d"):
            if key != "c":
                _member(tar, f"{key}.png", png.getvalue() if key != "b" else b"\x89PNG broken")
            if key != "a":
                _member(tar, f"{key}.txt", f"extra photo {key}".encode())
    pattern = str(out / "{00000..00003}.tar")
    expected = {str(out / "00001.tar"): CORRUPT_SHARD, f"{out / '00003.tar'}/a": MISSING_CAPTION,
                f"{out / '00003.tar'}/b": UNREADABLE_IMAGE, f"{out / '00003.tar'}/c": MISSING_IMAGE}
    ledger = SkipLedger()
    for epoch in range(2):  # 48 samples an epoch: more than the shards hold, so later passes read them again
        batches = list(build({"type": "webdataset", "path": pattern, "num_samples": 48, "num_workers": 2},
                             global_batch_size=4).batches(epoch))
        assert len(batches) == 12 and all(len(b) == 4 and len(set(texts(b))) == 4 for b in batches)
        records = [r for b in batches for r in b.skips]
        assert {r.source: r.reason for r in records} == expected and len(records) == 4
        ledger.add(records)
    once = {CORRUPT_SHARD: 1, MISSING_CAPTION: 1, MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1}
    assert ledger.epoch_counts(1) == once and ledger.counts() == {reason: 2 for reason in once}


def test_make_shards_image_root_and_split(tmp_path: Path) -> None:
    """Flickr8k's layout: names relative to images/, a split column; only the train rows become shards."""
    (tmp_path / "images").mkdir()
    rows = ["image\tcaption\tsplit"]
    for i in range(12):
        save_image(tmp_path / "images" / f"{i}.jpg", i)
        rows.append(f"{i}.jpg\tphoto {i}\t{('train', 'val', 'test')[i % 3]}")
    rows.append("gone.jpg\tmissing one\ttrain")
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    args = [str(tmp_path / "captions.tsv"), str(tmp_path / "out"), "--image-column", "image", "--caption-column",
            "caption", "--image-root", str(tmp_path / "images"), "--split", "train"]
    assert make_shards_main(args) == 0
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        captions = sorted(tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt"))
    assert captions == sorted(f"photo {i}" for i in range(0, 12, 3))
    assert read_skipped_tsv(tmp_path / "out" / "skipped.tsv") == [
        (f"{tmp_path / 'captions.tsv'}:14", MISSING_FILE, str(tmp_path / "images" / "gone.jpg"))]
    with pytest.raises(ClipforgeError, match="matches no row"):
        make_shards_main([*args[:-1], "validation"])


def test_make_shards_on_real_flickr8k_rows(tmp_path: Path) -> None:
    table = SHARED_FLICKR / "captions.tsv"
    if not table.is_file():
        pytest.skip(f"Flickr8k not found at {table}")
    head = table.read_text(encoding="utf-8").splitlines()[:31]  # 6 images x 5 captions, mixed splits
    (tmp_path / "captions.tsv").write_text("\n".join(head) + "\n", encoding="utf-8")
    summary = write_shards(tmp_path / "captions.tsv", tmp_path / "out", image_column="image", caption_column="caption",
                           image_root=str(SHARED_FLICKR / "images"), split="train")
    assert summary.skipped == {} and summary.samples == sum(line.endswith("\ttrain") for line in head)


def test_skipped_tsv_escapes_and_reads_back(tmp_path: Path) -> None:
    records = [SkipRecord(0, "a\tb.csv:2", MISSING_FILE, "x\ny\\z"), SkipRecord(1, "s.tar/k\udce9", BAD_UTF8)]
    path = write_skipped_tsv(records, tmp_path / "skipped.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "source\treason\tdetail" and all(line.count("\t") == 2 for line in lines)
    assert lines[2].startswith("s.tar/k\\xe9\t")
    assert read_skipped_tsv(path) == [(r.source, r.reason, r.detail) for r in records]
    assert Counter(r.reason for r in records) == {MISSING_FILE: 1, BAD_UTF8: 1}
