"""WebDataset tar shards as a ``clipforge embed`` source: indexed once, then read member by member."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clipforge.collection.sources import (
    Loaded,
    Source,
    Unusable,
    printable,
)
from clipforge.data.skips import (
    CORRUPT_SHARD,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_SHARD,
    UNREADABLE_IMAGE,
    SkipRecord,
)
from clipforge.data.csv_dataset import caption_problem
from clipforge.errors import ClipforgeError, shorten

__all__ = ["WebDatasetSource"]


@dataclass
class _Member:
    offset: int
    size: int
    mtime: float
    name: str


class WebDatasetSource(Source):
    """Samples of local, uncompressed WebDataset tar shards (brace patterns as training reads them), in shard
    order. The shards are indexed once (headers only), so any sample is one positioned read: parts and
    ranks then cut the samples exactly as they cut files. A missing shard, or the rest of a truncated
    one, is skipped and named as training names it."""

    source_type = "webdataset"

    def __init__(self, pattern: str, *, caption_key: str | None = None) -> None:
        from clipforge.data.webdataset_source import expand_shards

        super().__init__(pattern)
        self.caption_key = caption_key.lstrip(".").lower() if caption_key else None
        self.kinds = ("img", "text") if self.caption_key else ("img",)
        urls = expand_shards(pattern)
        if not urls:
            raise ClipforgeError(f"'{shorten(pattern)}' names no shards; use e.g. 'shards/{{00000..00009}}.tar'")
        if any("://" in u and not u.startswith("file://") for u in urls):
            raise ClipforgeError(f"'{shorten(pattern)}' names remote shards; clipforge embed reads local .tar files, "
                                 "so download them first")
        self.shards = [os.path.abspath(u.removeprefix("file://")) for u in urls]
        self.samples: list[tuple[int, str, dict[str, _Member]]] = []
        for number, shard in enumerate(self.shards):
            self._index(number, shard)
        if not self.samples:
            first = self.listing_skips[0] if self.listing_skips else None
            why = f" ({first.reason}: {shorten(first.detail)})" if first else ""
            raise ClipforgeError(f"the {len(self.shards)} shard(s) of '{shorten(pattern)}' hold no samples{why}; "
                                 "check the path and pattern")

    def _index(self, number: int, shard: str) -> None:
        """Add the shard's samples (members grouped by key, as webdataset groups them)."""
        from webdataset.tariterators import base_plus_ext

        from clipforge.data.webdataset_source import _META, _StrictTarInfo

        try:
            size = os.path.getsize(shard)
            with open(shard, "rb") as f:
                head = f.read(3)
        except OSError as error:
            self.listing_skips.append(SkipRecord(0, shard, MISSING_SHARD, error.strerror or str(error)))
            return
        if head[:2] == b"\x1f\x8b" or head == b"BZh" or head[:3] == b"\xfd7z":
            raise ClipforgeError(f"shard '{shorten(shard)}' is compressed; clipforge embed reads uncompressed .tar "
                                 "shards (as img2dataset and make-shards write them)")
        current: tuple[str, dict[str, _Member]] | None = None
        try:
            with tarfile.open(shard, mode="r:", tarinfo=_StrictTarInfo) as tar:
                for member in tar:
                    if not member.isreg() or _META.match(member.name):
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    if current is None or current[0] != key:
                        if current is not None:
                            self.samples.append((number, *current))
                        current = (key, {})
                    if member.offset_data + member.size > size:  # this sample is the one the break cut short
                        raise tarfile.ReadError(f"truncated: member '{member.name}' runs past the end of the file")
                    current[1][ext.lower()] = _Member(member.offset_data, member.size, float(member.mtime),
                                                      member.name)
                    tar.members = []  # a large shard's headers need not stay in memory
        except (tarfile.TarError, OSError, ValueError) as error:
            self.listing_skips.append(SkipRecord(0, shard, CORRUPT_SHARD, f"{type(error).__name__}: {error}"))
            current = None  # the member the break cut short belongs to the broken shard
        if current is not None:
            self.samples.append((number, *current))

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        number, key, _ = self.samples[index]
        return f"{self.shards[number]}/{key}"

    def _read(self, shard: str, member: _Member) -> bytes:
        with open(shard, "rb") as f:
            return os.pread(f.fileno(), member.size, member.offset)

    def load(self, index: int, image: bool, text: bool) -> Loaded:
        from clipforge.data.webdataset_source import IMAGE_EXTENSIONS

        number, _, members = self.samples[index]
        shard = self.shards[number]
        caption_member = members.get(self.caption_key or "txt")
        caption = None
        if caption_member is not None:
            caption = self._read(shard, caption_member).decode("utf-8", errors="surrogateescape")
        if text:
            if caption_member is None:
                raise Unusable(MISSING_CAPTION, f"no .{self.caption_key} member")
            problem = caption_problem(caption)
            if problem is not None:
                raise Unusable(problem, f"caption {printable(caption or '')!r}")
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        row: dict[str, Any] = {"image_path": None, "caption": printable(caption) if caption is not None else None,
                               "size": None, "mtime": None}
        pixels = None
        if image:
            if image_ext is None:
                raise Unusable(MISSING_IMAGE, f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
            member = members[image_ext]
            try:
                with Image.open(io.BytesIO(self._read(shard, member))) as opened:
                    opened.load()
                pixels = opened
            except Exception as error:  # noqa: BLE001 (Pillow raises many types for bad bytes)
                raise Unusable(UNREADABLE_IMAGE, f"{member.name}: {type(error).__name__}: {error}") from None
            row.update(image_path=printable(f"{shard}/{member.name}"), size=member.size, mtime=member.mtime)
        return Loaded(pixels, caption, row)
