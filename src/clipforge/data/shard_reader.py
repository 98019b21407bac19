"""Reading WebDataset tar shards into raw samples: opening a URL, strict tar reading, grouping members by key.

A URL opens in one of three ways, chosen per scheme before any worker starts (``opener_kinds``):
local paths and ``file://`` with ``open``; schemes fsspec knows (``http(s)://``, ``s3://``, ``gs://``,
``memory://``, ...) with fsspec when it and the scheme's backend are installed (``pip install
'clipforge[remote]'``; add s3fs or gcsfs for s3:// or gs://); anything else, ``pipe:`` included, with
webdataset's ``gopen`` (curl for http without fsspec, as before). A shard that cannot be opened (404,
no such key or file) is a ``missing_shard``; one that breaks while read is a ``corrupt_shard`` and the
member the break cut in half is part of it (``__partial__``), not a record of its own.
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from PIL import Image

from clipforge.data.csv_dataset import caption_problem
from clipforge.data.skips import (
    CORRUPT_SHARD,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_SHARD,
    UNREADABLE_IMAGE,
    SkipRecord,
)
from clipforge.errors import ClipforgeError, shorten

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LOCAL, FSSPEC, WEBDATASET = "local", "fsspec", "webdataset"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then every extension


class _StrictTarInfo(tarfile.TarInfo):
    """Python's tarfile ends quietly where a header is cut short or missing; for a shard that is truncation."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise tarfile.ReadError(f"truncated: the data ends at byte {tar.offset} without the end-of-archive "
                                    "block") from None
        except tarfile.InvalidHeaderError as error:
            raise tarfile.ReadError(f"corrupt tar header at byte {tar.offset}: {error}") from None


def url_scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    return "" if len(scheme) == 1 else scheme  # 'C:\\shards' is a Windows path, not a scheme


def _opener_kind(scheme: str) -> str:
    if scheme in ("", "file"):
        return LOCAL
    if scheme == "pipe":
        return WEBDATASET
    missing = ""
    try:
        import fsspec

        if scheme in fsspec.available_protocols():
            fsspec.get_filesystem_class(scheme)  # ImportError when the backend (aiohttp, s3fs, gcsfs) is absent
            return FSSPEC
    except ImportError as error:
        missing = f" ({shorten(error, 80)})"
    from webdataset.gopen import gopen_schemes

    if scheme in gopen_schemes:
        return WEBDATASET
    raise ClipforgeError(f"data.path has '{scheme}://' shards that nothing installed can open{missing}; install "
                         "fsspec with that scheme's backend: pip install 'clipforge[remote]' (plus s3fs for s3:// "
                         "or gcsfs for gs://)")


def opener_kinds(urls: Iterable[str]) -> dict[str, str]:
    """{scheme: how its shards open}; a ``ClipforgeError`` for a scheme nothing can open."""
    return {scheme: _opener_kind(scheme) for scheme in sorted({url_scheme(u) for u in urls})}


def local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else url


def open_shard(url: str, kind: str) -> BinaryIO:
    if kind == LOCAL:
        return open(local_path(url), "rb")
    if kind == FSSPEC:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(url)
        # One streamed GET for http(s), instead of a range request per block.
        options = {"block_size": 0} if url_scheme(url) in ("http", "https") else {}
        return fs.open(path, "rb", **options)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


class SkipCounter:
    """Records each broken shard once (and warns once) for one worker's pass; the caller drains the records."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.records: list[SkipRecord] = []
        self.bad_urls: set[str] = set()

    def record(self, url: str, error: Exception, reason: str) -> None:
        if url in self.bad_urls:
            return
        self.bad_urls.add(url)
        message = f"{type(error).__name__}: {error.args[0] if error.args else error}"
        self.records.append(SkipRecord(self.epoch, url, reason, message))
        warnings.warn(f"skipping the rest of shard '{url}': {message}", stacklevel=2)

    def drain(self) -> list[SkipRecord]:
        records, self.records = self.records, []
        return records


def read_samples(shards: Iterable[dict[str, Any]], counter: SkipCounter,
                 kinds: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", "__source__", "__draw__", ext: bytes, ...}`` of each shard in turn.

    Samples of two shards never merge; a shard's error is recorded in ``counter`` and reading goes on
    with the next shard.
    """
    for shard in shards:
        url = shard["url"]
        try:
            stream = open_shard(url, kinds[url_scheme(url)])
        except Exception as error:  # noqa: BLE001 (any failure to open: the shard is missing for us)
            counter.record(url, error, MISSING_SHARD)
            continue
        current: dict[str, Any] | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for member in tar:
                    if not member.isreg() or _META.match(member.name):
                        continue
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    tar.members = []  # stream mode would keep every header
                    match = _KEY.match(member.name)
                    if match is None:
                        continue
                    key, extension = match.group(1), match.group(2).lower()
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            yield current
                        current = {"__key__": key, "__url__": url, "__source__": shard["source"],
                                   "__draw__": shard["draw"]}
                    if extension in current:
                        raise ValueError(f"{member.name}: duplicate file name in the shard")
                    current[extension] = data
        except Exception as error:  # noqa: BLE001 (recorded; the run goes on)
            counter.record(url, error, MISSING_SHARD if isinstance(error, FileNotFoundError) else CORRUPT_SHARD)
            if current is not None:
                current["__partial__"] = True  # the member the break cut in half belongs to the broken shard
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        if current is not None:
            yield current


def decode(sample: dict[str, Any]) -> tuple[Image.Image, str] | str:
    """(image, caption), or the reason the sample is skipped (the same rules as a CSV row)."""
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None:
        return MISSING_IMAGE
    if "txt" not in sample:
        return MISSING_CAPTION
    caption = sample["txt"].decode("utf-8", errors="surrogateescape")
    problem = caption_problem(caption)
    if problem is not None:
        return problem
    try:
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image.load()
    except Exception:  # noqa: BLE001 (Pillow raises many types for bad bytes)
        return UNREADABLE_IMAGE
    return image, caption
