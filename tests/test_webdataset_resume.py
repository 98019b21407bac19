"""WebDataset exact resume: cut an epoch after any batch, rebuild the data from that batch's ``position``, and the
rest of the epoch is bit-identical (images, token ids, source counts, skip records) to the uninterrupted run:
with 0, 2 or 3 loader workers, one or two ranks, uneven shards (workers run dry, passes repeat), bad samples, a
truncated and a missing shard, and resampled weighted sources. All data is generated here, tiny."""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import Batch, DataConfig, SkipLedger, build_train_data
from clipforge.data.shard_lists import ShardList, resampled_shards
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.tokenizer import decode_batch

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine

SIZES = (7, 4, 9, 5, 3, 6)  # uneven; shard 4 is truncated, and the pattern names a 7th shard that is missing
IMAGE, CONTEXT, GLOBAL_BATCH, SEED, SAMPLES = 16, 16, 4, 3, 32


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_shards(folder: Path, prefix: str = "", sizes: tuple[int, ...] = SIZES, bad: bool = True) -> str:
    """Shards of ``sizes`` samples; with ``bad``: a broken image, a missing and an empty caption, a cut shard and
    a missing one. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        with tarfile.open(folder / f"{index:05d}.tar", "w") as tar:
            for row in range(size):
                key = f"{prefix}{index:02d}_{row:03d}"
                _member(tar, f"{key}.png", b"\x89PNG broken" if bad and (index, row) == (1, 2) else
                        _png(sum(map(ord, prefix)) * 1000 + index * 100 + row))
                if not (bad and (index, row) == (2, 3)):
                    caption = "  " if bad and (index, row) == (3, 1) else f"{prefix} photo {row} of shard {index}"
                    _member(tar, f"{key}.txt", caption.encode())
    if bad:
        cut = folder / "00004.tar"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 300])
    last = len(sizes) if bad else len(sizes) - 1  # bad: one shard more than written, missing
    return str(folder / f"{{00000..{last:05d}}}.tar")


@pytest.fixture(scope="module")
def pattern(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("mixed")
    return write_shards(folder / "a", "a") + "::" + write_shards(folder / "b", "b", sizes=(5, 8, 6), bad=False)


def build(path: str, rank: int = 0, world_size: int = 1, **data):
    config = {"type": "webdataset", "path": path, "num_samples": SAMPLES, "num_workers": 0, **data}
    return build_train_data(DataConfig.from_dict(config), image_size=IMAGE, context_length=CONTEXT,
                            global_batch_size=GLOBAL_BATCH, rank=rank, world_size=world_size, seed=SEED)


def epochs(data, count: int = 2) -> list[list[Batch]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping the rest of shard ..."
        return [list(data.batches(epoch)) for epoch in range(count)]


def resume(data, epoch: int, before: Batch) -> list[Batch]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping the rest of shard", torch's "more workers than CPUs"
        warnings.filterwarnings("error", message="the saved data position")  # the position must be usable
        return list(data.batches(epoch, before.position["step"], before.position))


def assert_identical(expected: list[Batch], actual: list[Batch], reported_before: set[str]) -> None:
    """Bit-identical batches; skip records the same once those reported before the cut are left out."""
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert torch.equal(want.images, got.images) and torch.equal(want.texts, got.texts)
        assert want.source_counts == got.source_counts and want.position == got.position
        assert [r for r in got.skips if r.source not in reported_before] == want.skips
        reported_before |= {r.source for r in got.skips}


def cut_points(batches: list[Batch], epoch: int, every: bool) -> list[int]:
    """Every cut, or the few that matter (each costs loader start-ups): where a worker has run dry and where the
    next batch starts a new pass, and mid-epoch (epoch 0 only)."""
    if every:
        return list(range(1, len(batches)))
    after = range(1, len(batches))
    dry = next((k for k in after if any(batches[k - 1].position["done"])), None)
    boundary = next((k for k in after if batches[k].position["pass"] != batches[k - 1].position["pass"]), None)
    cuts = {dry, boundary} if epoch == 0 else {dry or boundary}
    return sorted(k for k in cuts | {len(batches) // 2 if epoch == 0 else None} if k is not None)


def check_resumes(make, ranks: int, every: bool) -> list[list[list[Batch]]]:
    """For each rank: the uninterrupted 2 epochs, then resumes from cuts of each epoch (with loader workers, of the
    last rank only: each resume starts processes, and the ranks differ only in their shards)."""
    runs = []
    for rank in range(ranks):
        full = epochs(make(rank))
        runs.append(full)
        for epoch, batches in enumerate(full):
            assert len(batches) == SAMPLES // GLOBAL_BATCH
            assert all(b.position["epoch"] == epoch and b.position["step"] == i + 1 for i, b in enumerate(batches))
            for k in cut_points(batches, epoch, every) if every or rank == ranks - 1 else []:
                resumed = resume(make(rank), epoch, batches[k - 1])
                assert_identical(batches[k:], resumed, {r.source for b in batches[:k] for r in b.skips})
                ledger, whole = SkipLedger(), SkipLedger()
                ledger.add(r for b in batches[:k] + resumed for r in b.skips)
                whole.add(r for b in batches for r in b.skips)
                assert ledger.counts() == whole.counts() and ledger.records() == whole.records()
    return runs


def texts(batch: Batch) -> list[str]:
    return [t.replace(" ", "") for t in decode_batch(batch.texts)]


@pytest.mark.parametrize("workers, world_size", [(0, 1), (0, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_resume_after_any_batch_is_bit_identical(pattern: str, workers: int, world_size: int) -> None:
    runs = check_resumes(lambda rank: build(pattern, rank, world_size, num_workers=workers), world_size,
                         every=workers == 0)
    batches = [b for run in runs for epoch in run for b in epoch]
    assert any(b.position["pass"] > 0 for b in batches)  # the shards ran out: passes repeated
    assert any(any(b.position["done"]) for b in batches) or workers == 0  # a worker ran dry before the others
    reasons = Counter(r.reason for b in batches for r in b.skips)
    assert {"corrupt_shard", "missing_shard", "missing_caption", "empty_caption", "unreadable_image"} <= set(reasons)
    for run in runs:  # every epoch sees each sample at most once per pass (no sample twice in a batch)
        assert all(len(set(texts(b))) == len(b) == GLOBAL_BATCH // world_size for e in run for b in e)


@pytest.mark.parametrize("workers, world_size", [(0, 1), (2, 2), (3, 1)])
def test_resampled_mixed_sources_resume_bit_identically(mixed: str, workers: int, world_size: int) -> None:
    runs = check_resumes(lambda rank: build(mixed, rank, world_size, num_workers=workers, resampled=True,
                                            upsampling_factors=[1, 3], source_names="a::b"), world_size,
                         every=workers == 0)
    batches = [b for run in runs for e in run for b in e]
    assert all(b.position["resampled"] and b.position["pass"] == 0 for b in batches)
    assert all(set(b.source_counts) == {"a", "b"} and sum(b.source_counts.values()) == len(b) for b in batches)
    for b in batches:  # the counts name the right source
        assert sorted(t[0] for t in texts(b)) == sorted("a" * b.source_counts["a"] + "b" * b.source_counts["b"])


def test_resampled_seeds_differ_per_rank_and_worker(mixed: str) -> None:
    options = {"resampled": True, "num_workers": 2, "num_samples": 32}
    ranks = [list(build(mixed, rank, 2, **options).batches(0)) for rank in range(2)]
    assert [texts(b) for b in ranks[0]] != [texts(b) for b in ranks[1]]
    alone = list(build(mixed, **options).batches(0))  # batches alternate: logical worker 0, 1, 0, 1, ...
    assert [texts(b) for b in alone[0::2]] != [texts(b) for b in alone[1::2]]
    assert [b.position["next"] for b in alone[:4]] == [1, 0, 1, 0]
    assert [texts(b) for b in list(build(mixed, **options).batches(1))] != [texts(b) for b in alone]


def test_resampled_draws_follow_the_upsampling_factors(tmp_path: Path) -> None:
    # Shard level, many draws: each shard weighs its source's factor (open_clip's expand_urls).
    draws = 20_000
    for factors, share in (([1.0, 1.0], 6 / 8), ([3.0, 1.0], 6 / 12)):
        shards = ShardList.from_path("a/{0..1}.tar::b/{0..5}.tar", factors)
        picked = [s["source"] for _, s in zip(range(draws), resampled_shards(shards, draw_seed=5))]
        assert abs(sum(picked) / draws - share) < 4 * math.sqrt(share * (1 - share) / draws)
    # End to end: equal-size clean sources weighted [1, 3] give about 3/4 of the samples from the second.
    folder = tmp_path / "equal"
    path = write_shards(folder / "a", "a", (2,) * 4, bad=False) + "::" + write_shards(folder / "b", "b", (2,) * 4,
                                                                                     bad=False)
    config = {"type": "webdataset", "path": path, "num_samples": 2048, "num_workers": 0, "resampled": True,
              "upsampling_factors": "1::3"}
    data = build_train_data(DataConfig.from_dict(config), image_size=IMAGE, context_length=CONTEXT,
                            global_batch_size=64, seed=SEED)
    counts = Counter()
    for batch in data.batches(0):
        counts.update(batch.source_counts)
    total, draws = counts["source0"] + counts["source1"], 2048 // 2  # samples come in shards of 2
    assert total == 2048
    assert abs(counts["source1"] / total - 0.75) < 4 * math.sqrt(0.75 * 0.25 / draws)


def test_position_from_another_layout_warns_once_and_resumes_approximately(pattern: str, tmp_path: Path) -> None:
    full = epochs(build(pattern, num_workers=2), 1)[0]
    torch.save({"data": full[3].position}, tmp_path / "ckpt.pt")  # plain values: JSON and weights_only loads
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"] == full[3].position
    assert json.loads(json.dumps(full[3].position)) == full[3].position
    other = build(pattern, num_workers=3)
    with pytest.warns(UserWarning, match=r"num_workers=2 but this run has num_workers=3.*approximately at step 4"):
        rest = list(other.batches(0, 4, full[3].position))
    assert len(rest) == len(full) - 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(other.batches(0, 8, full[7].position))
    assert not [w for w in caught if "data position" in str(w.message)]  # once per data object
    # A position of the previous epoch at step 0 (saved at an epoch's end) is simply not needed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message="the saved data position")
        assert len(list(build(pattern, num_workers=2).batches(1, 0, full[-1].position))) == len(full)


def test_old_checkpoints_without_position_resume_exactly_on_clean_data(tmp_path: Path) -> None:
    """Without a position, start_step deals its batches round robin: exact while no sample is bad and no worker
    runs dry (the round robin no longer restarts at worker 0)."""
    path = write_shards(tmp_path, sizes=(4, 4, 4, 4), bad=False)
    data = build(path, num_workers=2, num_samples=16)
    full = list(data.batches(0))
    for k in (1, 3):
        rest = list(data.batches(0, k))
        assert all(torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts) for a, b in zip(full[k:], rest))
        assert len(rest) == len(full) - k and rest[-1].position == full[-1].position


def test_map_style_sources_accept_and_ignore_position() -> None:
    config = DataConfig.from_dict({"type": "synthetic", "num_samples": 12, "num_workers": 0})
    data = build_train_data(config, image_size=IMAGE, context_length=CONTEXT, global_batch_size=4)
    full = list(data.batches(0))
    assert all(b.position is None and b.source_counts == {} for b in full)
    rest = list(data.batches(0, 1, {"anything": 1}))
    assert all(torch.equal(a.images, b.images) for a, b in zip(full[1:], rest)) and len(rest) == 2


def test_resampled_data_that_never_fills_a_batch_is_one_sentence(tmp_path: Path) -> None:
    for name in ("empty-0.tar", "empty-1.tar"):
        tarfile.open(tmp_path / name, "w").close()
    (tmp_path / "garbage.tar").write_bytes(b"not a tar at all" * 64)
    data = build(f"{tmp_path}/{{empty-0,empty-1,garbage}}.tar::{tmp_path}/gone.tar", resampled=True,
                 upsampling_factors=[1, 2], num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ClipforgeError, match=r"^rank 0 drew every one of the 4 shard\(s\) of data.path and found "
                                                 r"no sample \(skipped: corrupt_shard=1, missing_shard=1\);"):
            next(iter(data.batches(0)))


@pytest.mark.parametrize("data, message", [
    ({"upsampling_factors": "1::3"}, "set data.resampled = true"),
    ({"resampled": True, "upsampling_factors": [1, 2, 3]}, "has 3 value.*2 '::'-separated source"),
    ({"resampled": True, "upsampling_factors": "1::x"}, "data.upsampling_factors must be positive numbers"),
    ({"resampled": True, "upsampling_factors": [1, 0]}, "data.upsampling_factors must be positive numbers"),
    ({"resampled": "maybe"}, "data.resampled must be true or false"),
    ({"source_names": ["a"]}, "data.source_names must hold 2 distinct name"),
    ({"source_names": "a::a"}, "data.source_names must hold 2 distinct name"),
    ({"type": "csv", "resampled": True}, "data.resampled applies to data.type 'webdataset' only"),
])
def test_bad_source_fields_name_the_field(data: dict, message: str) -> None:
    config = {"type": "webdataset", "path": "a/{0..3}.tar::b/x.tar", "num_samples": 8, **data}
    with pytest.raises(ConfigError, match=message) as caught:
        DataConfig.from_dict(config)
    assert "\n" not in str(caught.value)


def test_source_fields_from_the_command_line_and_toml() -> None:
    base = {"type": "webdataset", "path": ["a/{0..3}.tar", "b/x.tar"], "num_samples": 8}
    config = DataConfig.from_dict({**base, "resampled": "true", "upsampling_factors": "1::2.5"})
    assert config.resampled is True and config.upsampling_factors == [1.0, 2.5] and config.source_names is None
    config = DataConfig.from_dict({**base, "resampled": True, "upsampling_factors": [2, 1],
                                   "source_names": ["laion", "cc12m"]})
    assert config.upsampling_factors == [2.0, 1.0] and config.source_names == ["laion", "cc12m"]
