"""WebDataset tar shards (img2dataset layout: ``{key}.jpg|png|webp`` + ``{key}.txt`` [+ ``.json``]), streamed.

Each rank runs ``N = max(1, data.num_workers)`` *logical* workers; ``shard_lists.py`` says which shards
each reads (per pass, or drawn with replacement under ``data.resampled``). A worker's raw samples go
through a shuffle buffer seeded by ``(seed, epoch, pass, rank, worker)``, are decoded, and batched to
exactly ``b = G // world_size`` (partial batches dropped); the random crop of a sample is seeded by
``(seed, epoch, pass, key)`` (resampled: by the worker and the shard's draw number too). Every rank
yields exactly ``steps_per_epoch = num_samples // G`` batches: when its shards run out it starts
another pass, so ranks never disagree on the number of steps (all_gather would hang).

Exact resume: each batch carries ``Batch.position`` (``stream_position.py``), the state of this rank's
stream after it. ``batches(epoch, start_step, position)`` rotates the roles (DataLoader worker ``i``
plays logical worker ``(i + next) % N``, since torch's DataLoader yields round robin from worker 0 in
order, skipping finished ones; it must keep its default ``in_order=True``), and each logical worker
drops, undecoded, exactly the raw samples it had consumed. So the batches that follow are bit-identical
to an uninterrupted run's, bad samples, dry workers and repeated passes included (skip records too, except
that a source reported before the cut may be reported again). Dropping still reads the dropped samples
(a tar stream has no index), so resuming late in a long epoch costs that read time once. A position made with
another world_size, num_workers, rank, shard list, seed or batch size cannot be used: ``batches`` warns
once and falls back to the old approximate skip (``start_step`` batches of ``b`` raw samples dealt round
robin; exact only if no sample was bad and no worker ran dry), as it does without a position.

Corrupt or truncated shards, missing shards and bad members never stop the run: each is dropped
(the batch fills with the next samples of the stream) and reported as a ``SkipRecord`` in
``Batch.skips`` (see ``shard_reader.py`` for the names). A source is reported once per ``batches`` call
(an epoch may read a shard in two passes); ``skips.SkipLedger`` also dedups across ranks and resumes.
``Batch.source_counts`` counts each batch's samples per source name (``shard_lists.py``).
"""

from __future__ import annotations

import itertools
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.loader import Batch, DataConfig, TrainData, _identity, crop_with_seed, sample_seed
from clipforge.data.shard_lists import ShardList, expand_shards, pass_shards, resampled_shards
from clipforge.data.shard_lists import split_top_level as _split_top_level  # noqa: F401 (re-exported)
from clipforge.data.shard_reader import (  # noqa: F401 (_META, _StrictTarInfo: re-exported for collection)
    _META,
    IMAGE_EXTENSIONS,
    LOCAL,
    SkipCounter,
    _StrictTarInfo,
    decode,
    local_path,
    opener_kinds,
    read_samples,
    url_scheme,
)
from clipforge.data.skips import UNREADABLE_IMAGE, SkipRecord, count_reasons, format_counts
from clipforge.data.stream_position import StreamState
from clipforge.errors import ClipforgeError
from clipforge.tokenizer import get_tokenizer, tokenize
from clipforge.transforms import image_transform

__all__ = ["IMAGE_EXTENSIONS", "WebDatasetTrainData", "expand_shards"]

SHUFFLE_BUFFER = 1000  # raw (undecoded) samples per worker
SHUFFLE_INITIAL = 100
HOPELESS_BAD = 10 * SHUFFLE_BUFFER  # resampled: bad samples after every shard was tried, none good: give up


def shuffle_buffer(samples: Iterator[Any], rng: random.Random, size: int = SHUFFLE_BUFFER,
                   initial: int = SHUFFLE_INITIAL) -> Iterator[Any]:
    """webdataset's ``shuffle`` (the same draws), kept here so a saved position cannot change meaning."""
    buffer: list[Any] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) < size:
            buffer.extend(itertools.islice(samples, 1))
        if len(buffer) >= initial:
            k = rng.randint(0, len(buffer) - 1)
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    while buffer:
        k = rng.randint(0, len(buffer) - 1)
        buffer[k], buffer[-1] = buffer[-1], buffer[k]
        yield buffer.pop()


class _Report(NamedTuple):
    """What a worker sends: a batch, or (batch None) its end with the tail's records or why it gave up."""

    worker: int  # logical worker
    consumed: int  # raw samples it has taken from its shuffle buffer in this pass
    batch: Batch | None
    skips: list[SkipRecord]
    failure: str = ""


class _Watch:
    """A resampled worker draws forever; this tells data that can never fill a batch from bad luck."""

    def __init__(self, shards: int) -> None:
        self.shards, self.tried, self.samples, self.good, self.hopeless = shards, set(), 0, 0, 0

    def draws(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            if len(self.tried) == self.shards and self.samples == 0:
                return  # every shard tried, not one sample read
            self.tried.add(shard["url"])
            yield shard

    def count(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            self.samples += 1
            yield sample

    def bad(self) -> bool:
        """True once giving up is right: no good sample ever, every shard tried, many bad samples since."""
        if self.good == 0 and len(self.tried) == self.shards:
            self.hopeless += 1
        return self.hopeless >= HOPELESS_BAD


class _ShardStream(IterableDataset):
    """One rank's pass over its shards: each DataLoader worker plays one logical worker and sends ``_Report``s."""

    def __init__(self, owner: WebDatasetTrainData, epoch: int, state: StreamState) -> None:
        self.owner, self.epoch, self.state = owner, epoch, state

    def __iter__(self) -> Iterator[_Report]:
        o, state, epoch = self.owner, self.state, self.epoch
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + state.next) % state.workers
        if state.done[worker]:
            return
        counter = SkipCounter(epoch)
        watch = _Watch(len(set(o.shards.urls)))
        if o.resampled:
            draw_seed = sample_seed("resample", o.seed, epoch, o.rank, worker)
            shards = watch.draws(resampled_shards(o.shards, draw_seed=draw_seed))
        else:
            shards = pass_shards(o.shards, order_seed=sample_seed("shards", o.seed, epoch, state.pass_index),
                                 rank=o.rank, world_size=o.world_size, worker=worker, workers=state.workers)
        samples = watch.count(read_samples(shards, counter, o.openers))
        rng = random.Random(sample_seed("buffer", o.seed, epoch, state.pass_index, o.rank, worker))
        stream = shuffle_buffer(samples, rng)
        consumed = sum(1 for _ in itertools.islice(stream, state.consumed[worker]))
        counter.drain()  # records met while skipping belong to the batches before the position
        transform = image_transform(o.image_size, train=True, resize_ratio=o.resize_ratio)
        images = torch.empty(o.local_batch_size, 3, o.image_size, o.image_size)
        captions: list[str] = []
        sources = [0] * len(o.shards.names)
        skips: list[SkipRecord] = []
        for sample in stream:
            consumed += 1
            skips += counter.drain()
            decoded = decode(sample)
            if not isinstance(decoded, str):
                image, caption = decoded
                key = sample["__key__"]
                crop_seed = sample_seed(o.seed, epoch, "draw", o.rank, worker, sample["__draw__"], key) \
                    if o.resampled else sample_seed(o.seed, epoch, state.pass_index, key)
                try:
                    pixels = crop_with_seed(transform, image, crop_seed)
                except Exception:  # noqa: BLE001 (a transform failure is a bad image)
                    decoded = UNREADABLE_IMAGE
            if isinstance(decoded, str):
                if not sample.get("__partial__"):  # a cut-off member is the broken shard's, already recorded
                    skips.append(SkipRecord(epoch, f"{sample['__url__']}/{sample['__key__']}", decoded))
                if o.resampled and watch.bad():
                    break
                continue
            watch.good += 1
            images[len(captions)] = pixels
            captions.append(caption)
            sources[sample["__source__"]] += 1
            if len(captions) == o.local_batch_size:
                batch = Batch(images, tokenize(captions, o.context_length, truncate=True), {}, skips,
                              source_counts=dict(zip(o.shards.names, sources)))
                yield _Report(worker, consumed, batch, [])
                images = torch.empty(o.local_batch_size, 3, o.image_size, o.image_size)
                captions, skips, sources = [], [], [0] * len(o.shards.names)
        failure = ""
        if o.resampled:  # only giving up ends a resampled stream
            failure = (f"rank {o.rank} drew every one of the {watch.shards} shard(s) of data.path and found "
                       f"{'no sample' if watch.samples == 0 else 'no usable sample'} (skipped: "
                       f"{format_counts(count_reasons(skips + counter.records))}); check data.path and the shards")
        yield _Report(worker, consumed, None, skips + counter.drain(), failure)


class WebDatasetTrainData(TrainData):
    """Streams shards; see the module docstring for splitting, passes and resume."""

    def __init__(self, config: DataConfig, *, image_size: int, context_length: int, global_batch_size: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.shards = ShardList.from_path(config.path or "", config.upsampling_factors, config.source_names)
        self.urls = list(self.shards.urls)
        if not self.urls:
            raise ClipforgeError(f"data.path '{config.path}' names no shards; use e.g. 'shards/{{00000..00127}}.tar'")
        self.openers = opener_kinds(self.urls)
        local = [u for u in self.urls if self.openers[url_scheme(u)] == LOCAL]
        if local and len(local) == len(self.urls) and not any(os.path.isfile(local_path(u)) for u in local):
            raise ClipforgeError(f"none of the {len(local)} shards of data.path '{config.path}' exists "
                                 f"(first: '{local[0]}'); check the path and pattern")
        self.resampled = config.resampled
        if len(self.urls) < world_size and not self.resampled:
            raise ClipforgeError(f"data.path has {len(self.urls)} shard(s) but world_size is {world_size}; every "
                                 "rank needs at least one shard: write more, smaller shards (or set data.resampled "
                                 "= true)")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.steps_per_epoch = (config.num_samples or 0) // global_batch_size
        self.image_size, self.context_length = image_size, context_length
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = config.num_workers
        self.workers = max(1, config.num_workers)  # logical streams; 0 workers read one stream in this process
        self.resize_ratio = config.resize_ratio
        self.fingerprint = f"{sample_seed(self.shards, self.resampled, seed, self.local_batch_size):016x}"
        self._warned = False

    def _start(self, epoch: int, start_step: int, position: dict[str, Any] | None) -> StreamState:
        """The state to start from: the position's when it fits this run, else the approximate one."""
        if position is not None and not (start_step == 0 and position.get("epoch") != epoch):
            state = StreamState.from_position(
                position, epoch=epoch, step=start_step, rank=self.rank, world_size=self.world_size,
                num_workers=self.workers, resampled=self.resampled, stream=self.fingerprint)
            if isinstance(state, StreamState):
                return state
            if not self._warned:
                self._warned = True
                warnings.warn(f"the saved data position cannot be used because {state}, so epoch {epoch} resumes "
                              f"approximately at step {start_step} (a few samples may repeat or be missed)",
                              stacklevel=3)
        return StreamState.approximate(self.workers, start_step, self.local_batch_size)

    def batches(self, epoch: int, start_step: int = 0, position: dict[str, Any] | None = None) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from ``start_step``; ``position``: that of batch ``start_step - 1``."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        state = self._start(epoch, start_step, position)
        if self.num_workers:
            get_tokenizer()  # loaded here once: forked workers share it instead of each reading the BPE merges
        step, pending, reported = start_step, [], set()  # reported: sources already reported this epoch
        while step < self.steps_per_epoch:
            fresh, produced = state.fresh(), 0
            loader = DataLoader(_ShardStream(self, epoch, state.copy()), batch_size=None, num_workers=self.num_workers,
                                collate_fn=_identity, pin_memory=False, persistent_workers=False,
                                generator=torch.Generator().manual_seed(sample_seed("loader", self.seed, epoch)))
            iterator = iter(loader)
            try:
                for report in iterator:
                    state.report(report.worker, report.consumed, done=report.batch is None)
                    if report.failure:
                        raise ClipforgeError(report.failure)
                    if report.batch is None:
                        pending += report.skips
                        continue
                    batch, produced, step = report.batch, produced + 1, step + 1
                    fresh_records = [r for r in pending + batch.skips if r.source not in reported]
                    reported.update(r.source for r in fresh_records)
                    batch.skips, batch.skipped, pending = fresh_records, count_reasons(fresh_records), []
                    batch.position = state.to_position(epoch=epoch, step=step, rank=self.rank,
                                                       world_size=self.world_size, resampled=self.resampled,
                                                       stream=self.fingerprint)
                    yield batch
                    if step == self.steps_per_epoch:
                        break
            finally:
                del iterator  # stops the workers at once when the epoch ends mid-pass
            if produced == 0 and fresh:
                raise ClipforgeError(
                    f"rank {self.rank} got no usable batch of {self.local_batch_size} from its shards of "
                    f"{len(self.urls)} (skipped: {format_counts(count_reasons(pending))}); check data.path and "
                    "the shard contents")
            state = state.next_pass()
