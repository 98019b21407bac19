"""WebDataset tar shards (img2dataset layout: ``{key}.jpg|png|webp`` + ``{key}.txt`` [+ ``.json``]), streamed.

Per epoch and per pass over the shards: the shard list is shuffled with ``(seed, epoch, pass)`` (the
same on every rank), rank ``r`` takes shards ``r, r+W, ...`` and ``wds.split_by_worker`` deals those
to the DataLoader workers, so no sample repeats within a pass when shards divide evenly. Samples are
shuffled in a buffer seeded by ``(seed, epoch, pass, rank, worker)``, decoded, and batched to exactly
``b = G // world_size`` (partial batches dropped). Every rank yields exactly ``steps_per_epoch =
num_samples // G`` batches: when its shards run out it starts another pass, so ranks never disagree
on the number of steps (all_gather would hang).

Resume is approximate: ``batches(epoch, start_step)`` makes each worker drop, undecoded, the raw
samples that its share of the first ``start_step`` batches would have used. With no bad samples and
no worker running dry the same batches follow (exactly the same, in order, with ``num_workers=0``);
otherwise a few samples may be seen twice or missed in that epoch.

Corrupt or truncated shards, missing shards and bad members never stop the run: each is dropped
(the batch fills with the next samples of the stream, which are distinct within a pass) and reported
as a ``SkipRecord`` in ``Batch.skips``: a member as ``shard/key`` (``missing_image``,
``missing_caption``, ``empty_caption``, ``bad_utf8``, ``unreadable_image``), a broken shard as its URL
(``corrupt_shard``, ``missing_shard``; warned about once). The member a truncation cut in half is
part of the broken shard, not a record of its own. A source is reported once per ``batches`` call
(an epoch may read a shard in two passes); ``skips.SkipLedger`` also dedups across ranks.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import random
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.csv_dataset import caption_problem
from clipforge.data.loader import Batch, DataConfig, TrainData, _identity, crop_with_seed, sample_seed
from clipforge.data.skips import (
    CORRUPT_SHARD,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_SHARD,
    UNREADABLE_IMAGE,
    SkipRecord,
    count_reasons,
    format_counts,
)
from clipforge.errors import ClipforgeError
from clipforge.tokenizer import tokenize
from clipforge.transforms import image_transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # raw (undecoded) samples per worker
SHUFFLE_INITIAL = 100


def _split_top_level(text: str) -> list[str]:
    """Split on '::' and on commas outside braces ('{a,b}' is a brace alternative, not a list)."""
    parts, depth, current = [], 0, ""
    for char in text.replace("::", "\0"):
        depth += (char == "{") - (char == "}")
        if char == "\0" or (char == "," and depth == 0):
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def expand_shards(path: str) -> list[str]:
    """Shard URLs/paths from a pattern such as 'a/{00000..00009}.tar,b/x.tar' (brace expansion by webdataset)."""
    urls: list[str] = []
    for part in _split_top_level(path):
        urls.extend(wds.shardlists.expand_urls(part))
    return urls


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


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


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _tar_files(streams: Iterable[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_expander``, reading each tar strictly; ``{}`` marks the end of each shard."""
    for source in streams:
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for member in tar:
                    if member.isreg() and not _META.match(member.name):
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        yield {"fname": member.name, "data": data, "__url__": source["url"]}
                    tar.members = []  # stream mode would keep every header
        except Exception as error:  # noqa: BLE001 (the handler records it and says go on)
            if not handler(error):
                break
        finally:
            with contextlib.suppress(Exception):
                source["stream"].close()
        yield {}  # the samples of two shards never merge into one


def _tar_samples(shards: Iterable[dict[str, Any]], handler: Any) -> Iterator[dict[str, Any]]:
    streams = wds.tariterators.url_opener(shards, handler=handler)
    return wds.tariterators.group_by_keys(_tar_files(streams, handler), handler=handler)


class _SkipCounter:
    """The webdataset error handler: records each broken shard once, warns once, never re-raises."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.records: list[SkipRecord] = []
        self.url: str | None = None  # the shard being read (shards are opened lazily, one at a time)
        self.bad_urls: set[str] = set()

    def track(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            self.url = shard["url"]
            yield shard

    def __call__(self, error: Exception) -> bool:
        url = self.url or "?"
        if url not in self.bad_urls:
            self.bad_urls.add(url)
            reason = MISSING_SHARD if isinstance(error, FileNotFoundError) else CORRUPT_SHARD
            message = f"{type(error).__name__}: {error.args[0] if error.args else error}"
            self.records.append(SkipRecord(self.epoch, url, reason, message))
            warnings.warn(f"skipping the rest of shard '{url}': {message}", stacklevel=2)
        return True  # continue with the next sample or shard

    def mark_partial(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A sample of a shard already found broken can only be the member the break cut in half."""
        for sample in samples:
            if sample.get("__url__") in self.bad_urls:
                sample["__partial__"] = True
            yield sample

    def drain(self) -> list[SkipRecord]:
        records, self.records = self.records, []
        return records


def _decode(sample: dict[str, Any]) -> tuple[Image.Image, str] | str:
    """(image, caption), or the reason the sample is skipped (the same rules as a CSV row)."""
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None:
        return MISSING_IMAGE
    if "txt" not in sample:
        return MISSING_CAPTION
    try:
        caption = sample["txt"].decode("utf-8", errors="surrogateescape")
    except AttributeError:
        return MISSING_CAPTION
    problem = caption_problem(caption)
    if problem is not None:
        return problem
    try:
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image.load()
    except Exception:  # noqa: BLE001 (Pillow raises many types for bad bytes)
        return UNREADABLE_IMAGE
    return image, caption


class _ShardStream(IterableDataset):
    """One rank's pass over its shards, yielding ``Batch``es (and a final list of the tail's records)."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, local_batch_size: int, image_size: int,
                 context_length: int, seed: int, epoch: int, pass_index: int, skip_batches: int,
                 num_workers: int, resize_ratio: float = 1.0) -> None:
        self.resize_ratio = resize_ratio
        self.urls, self.rank, self.world_size = urls, rank, world_size
        self.b, self.image_size, self.context_length = local_batch_size, image_size, context_length
        self.seed, self.epoch, self.pass_index = seed, epoch, pass_index
        self.skip_batches, self.num_workers = skip_batches, max(1, num_workers)

    def __iter__(self) -> Iterator[Batch | list[SkipRecord]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        urls = list(self.urls)
        random.Random(sample_seed("shards", self.seed, self.epoch, self.pass_index)).shuffle(urls)
        mine = urls[self.rank::self.world_size]  # split_by_node with the given rank, not env variables
        counter = _SkipCounter(self.epoch)
        shards = counter.track(wds.split_by_worker(iter([{"url": u} for u in mine])))
        samples = counter.mark_partial(_tar_samples(shards, counter))
        rng = random.Random(sample_seed("buffer", self.seed, self.epoch, self.pass_index, self.rank, worker))
        samples = wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, rng=rng)(samples)
        # Resume: this worker made batches worker, worker+n, ... of the first skip_batches (round robin).
        skip = len(range(worker, self.skip_batches, self.num_workers)) * self.b
        samples = itertools.islice(samples, skip, None)
        transform = image_transform(self.image_size, train=True, resize_ratio=self.resize_ratio)
        images = torch.empty(self.b, 3, self.image_size, self.image_size)
        captions: list[str] = []
        skips: list[SkipRecord] = []
        for sample in samples:
            skips += counter.drain()
            decoded = _decode(sample)
            if not isinstance(decoded, str):
                image, caption = decoded
                try:
                    crop_seed = sample_seed(self.seed, self.epoch, self.pass_index, sample["__key__"])
                    pixels = crop_with_seed(transform, image, crop_seed)
                except Exception:  # noqa: BLE001 (a transform failure is a bad image)
                    decoded = UNREADABLE_IMAGE
            if isinstance(decoded, str):
                if not sample.get("__partial__"):  # a cut-off member is the broken shard's, already recorded
                    skips.append(SkipRecord(self.epoch, f"{sample.get('__url__', '?')}/{sample['__key__']}",
                                            decoded))
                continue
            images[len(captions)] = pixels
            captions.append(caption)
            if len(captions) == self.b:
                yield Batch(images, tokenize(captions, self.context_length, truncate=True), {}, skips)
                captions, skips = [], []
                images = torch.empty(self.b, 3, self.image_size, self.image_size)
        skips += counter.drain()
        if skips:
            yield skips  # records of the dropped tail still reach the training loop


class WebDatasetTrainData(TrainData):
    """Streams shards; see the module docstring for splitting, passes and resume."""

    def __init__(self, config: DataConfig, *, image_size: int, context_length: int, global_batch_size: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.urls = expand_shards(config.path or "")
        if not self.urls:
            raise ClipforgeError(f"data.path '{config.path}' names no shards; use e.g. 'shards/{{00000..00127}}.tar'")
        local = [u for u in self.urls if _is_local(u)]
        if local and len(local) == len(self.urls):
            present = [u for u in local if os.path.isfile(urlparse(u).path if u.startswith("file:") else u)]
            if not present:
                raise ClipforgeError(f"none of the {len(local)} shards of data.path '{config.path}' exists "
                                     f"(first: '{local[0]}'); check the path and pattern")
        if len(self.urls) < world_size:
            raise ClipforgeError(f"data.path has {len(self.urls)} shard(s) but world_size is {world_size}; every "
                                 "rank needs at least one shard: write more, smaller shards")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.steps_per_epoch = (config.num_samples or 0) // global_batch_size
        self.image_size, self.context_length = image_size, context_length
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = config.num_workers
        self.resize_ratio = config.resize_ratio

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        remaining = self.steps_per_epoch - start_step
        pending: list[SkipRecord] = []
        reported: set[str] = set()  # sources already reported this epoch: a second pass reads them again
        skip, pass_index = start_step, 0
        while remaining > 0:
            stream = _ShardStream(self.urls, rank=self.rank, world_size=self.world_size,
                                  local_batch_size=self.local_batch_size, image_size=self.image_size,
                                  context_length=self.context_length, seed=self.seed, epoch=epoch,
                                  pass_index=pass_index, skip_batches=skip, num_workers=self.num_workers,
                                  resize_ratio=self.resize_ratio)
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                pin_memory=False, persistent_workers=False,
                                generator=torch.Generator().manual_seed(sample_seed("loader", self.seed, epoch)))
            produced = 0
            iterator = iter(loader)
            try:
                for item in iterator:
                    if isinstance(item, list):
                        pending += item
                        continue
                    produced += 1
                    fresh = []
                    for record in pending + item.skips:
                        if record.source not in reported:
                            reported.add(record.source)
                            fresh.append(record)
                    item.skips, item.skipped, pending = fresh, count_reasons(fresh), []
                    yield item
                    remaining -= 1
                    if remaining == 0:
                        break
            finally:
                del iterator  # stops the workers at once when the epoch ends mid-pass
            if produced == 0 and skip == 0:
                raise ClipforgeError(
                    f"rank {self.rank} got no usable batch of {self.local_batch_size} from its shards of "
                    f"{len(self.urls)} (skipped: {format_counts(count_reasons(pending))}); check data.path and "
                    "the shard contents")
            skip, pass_index = 0, pass_index + 1
