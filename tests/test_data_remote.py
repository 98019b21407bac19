"""Remote WebDataset shards through fsspec: a local HTTP server and fsspec's memory:// filesystem give exactly the
batches the same shards give from disk (bad samples, a truncated and a missing shard included), with 0 and 2
loader workers (forked workers see memory:// contents); a scheme nothing can open is one sentence."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_webdataset_resume import CONTEXT, GLOBAL_BATCH, IMAGE, SAMPLES, write_shards

from clipforge.data import Batch, DataConfig, build_train_data
from clipforge.data.shard_reader import FSSPEC, WEBDATASET, opener_kinds
from clipforge.errors import ClipforgeError

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")  # fsspec's http backend


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_shards(folder)


@pytest.fixture(scope="module")
def server(local: tuple[Path, str]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving the shard folder; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(local[0]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def memory(local: tuple[Path, str]) -> Iterator[str]:
    """The same shards in fsspec's in-process memory filesystem; yields the base URL."""
    fs = fsspec.filesystem("memory")
    for shard in sorted(local[0].glob("*.tar")):
        fs.pipe_file(f"/clipforge-test/{shard.name}", shard.read_bytes())
    try:
        yield "memory://clipforge-test"
    finally:
        fs.rm("/clipforge-test", recursive=True)


def run(path: str, workers: int, epoch: int = 0, start_step: int = 0, position: dict | None = None) -> list[Batch]:
    config = DataConfig.from_dict({"type": "webdataset", "path": path, "num_samples": SAMPLES,
                                   "num_workers": workers})
    data = build_train_data(config, image_size=IMAGE, context_length=CONTEXT, global_batch_size=GLOBAL_BATCH,
                            seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping the rest of shard ...", torch's worker-count advice
        return list(data.batches(epoch, start_step, position))


def assert_same(local: list[Batch], remote: list[Batch], folder: Path, base: str) -> None:
    """Bit-identical batches; the same skip records, named by URL; positions equal but for the shard fingerprint."""
    assert len(local) == len(remote) == SAMPLES // GLOBAL_BATCH
    for a, b in zip(local, remote):
        assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts) and a.source_counts == b.source_counts
        assert [(r.source.replace(str(folder), base), r.reason) for r in a.skips] == \
            [(r.source, r.reason) for r in b.skips]
        assert {**a.position, "stream": ""} == {**b.position, "stream": ""}


def test_http_and_memory_open_with_fsspec(server: str, memory: str) -> None:
    assert opener_kinds([f"{server}/a.tar", f"{memory}/a.tar", "/x/a.tar", "file:///x/a.tar"]) == {
        "http": FSSPEC, "memory": FSSPEC, "": "local", "file": "local"}
    assert opener_kinds(["pipe:cat a.tar"]) == {"pipe": WEBDATASET}


@pytest.mark.parametrize("workers", [0, 2])
def test_http_shards_match_local_shards(local: tuple[Path, str], server: str, workers: int) -> None:
    folder, pattern = local
    expected = run(pattern, workers)
    remote = run(pattern.replace(str(folder), server), workers)
    assert_same(expected, remote, folder, server)
    reasons = {r.reason: r.source for b in remote for r in b.skips}
    assert reasons["missing_shard"] == f"{server}/00006.tar"  # a 404
    assert reasons["corrupt_shard"] == f"{server}/00004.tar"  # cut short


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_shards_match_local_shards(local: tuple[Path, str], memory: str, workers: int) -> None:
    folder, pattern = local
    remote = run(pattern.replace(str(folder), memory), workers)
    assert_same(run(pattern, workers), remote, folder, memory)
    assert {r.reason: r.source for b in remote for r in b.skips}["missing_shard"] == f"{memory}/00006.tar"


def test_http_resume_is_exact(local: tuple[Path, str], server: str) -> None:
    folder, pattern = local
    url = pattern.replace(str(folder), server)
    full = run(url, 2, epoch=1)
    rest = run(url, 2, epoch=1, start_step=5, position=full[4].position)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts) and a.position == b.position
               for a, b in zip(full[5:], rest))


def test_pipe_urls_stay_webdatasets(local: tuple[Path, str]) -> None:
    folder, _ = local
    listed = ",".join(f"pipe:cat {folder / f'0000{i}.tar'}" for i in (0, 2, 3, 5))
    batches = run(listed, 0)
    assert len(batches) == SAMPLES // GLOBAL_BATCH and all(len(b) == GLOBAL_BATCH for b in batches)


def test_a_scheme_nothing_opens_is_one_sentence() -> None:
    with pytest.raises(ClipforgeError, match=r"^data.path has 'nosuch://' shards that nothing installed can open; "
                                             r"install fsspec") as caught:
        opener_kinds(["nosuch://bucket/{0..3}.tar"])
    assert "\n" not in str(caught.value)
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(ClipforgeError, match=r"'s3://' shards .*s3fs"):
            opener_kinds(["s3://bucket/a.tar"])
