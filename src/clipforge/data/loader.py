"""One interface for every training source: ``build_train_data(config, ...) -> TrainData`` of ``Batch``es.

Map-style sources (CSV, synthetic) are exact: step ``s`` of epoch ``e`` holds the same rows and the
same pixels whatever the number of ranks or workers, because the order comes from a permutation
seeded by ``seed + epoch`` and each random crop from ``(seed, epoch, position in the epoch)``. So a
resumed or re-sharded run is bit-identical to an uninterrupted one. WebDataset shards stream
instead (``webdataset_source.py``).

Bad samples are dropped, never replaced. Rows known bad from the table alone (empty or non-UTF-8
caption, no such image file) are left out before the order is drawn, so they take no slot. An image
that is there but does not decode is only found in the worker: its slot is dropped and that batch is
one smaller. Refilling it with another row (as this module once did, with the next row) repeats that
row in the epoch, often in the same batch, where it is a false negative for the contrastive loss;
refilling from rows no other step uses would need the workers to agree on who takes which spare, so
the batch content would depend on timing and resume would no longer be exact. Smaller is exact.
The loss gathers equal-sized batches from every rank (``training.loss.gather_with_grad``) and
averages per-rank means, so under ``torch.distributed`` each step's batch is cut to the smallest
rank's size (one ``all_reduce(MIN)`` per step, in ``batches``; ``Batch.unused`` counts the good
samples cut). A step whose samples are all bad yields an empty batch: the loop skips it.

Each bad row is reported once per epoch as a ``SkipRecord`` in ``Batch.skips`` (``Batch.skipped``
holds their counts): rows known bad ride in rank 0's batch of step 0, a decode failure in the batch
whose slot it had, and the last step also decodes the < G rows that drop_last leaves out, so every
bad row is named every epoch. ``skips.SkipLedger`` counts them across epochs, ranks and resumes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipforge.data.csv_dataset import BadSample, CsvSource
from clipforge.data.shard_lists import check_source_fields
from clipforge.data.skips import UNREADABLE_IMAGE, SkipRecord, count_reasons, format_counts
from clipforge.data.synthetic import EVAL_OFFSET, SyntheticCaptions
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.tokenizer import tokenize
from clipforge.transforms import ImageTransform, image_transform

TYPES = ("csv", "webdataset", "synthetic")
DEFAULT_SYNTHETIC_SAMPLES = 10_000
MAX_CONSECUTIVE_BAD = 1000  # about this many samples in a row that do not decode: the data, not a file, is broken
_SEPARATOR_ALIASES = {"\\t": "\t", "tab": "\t", "comma": ",", "space": " "}


def _int_field(name: str, value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"data.{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"data.{name} must be >= {minimum}, got {value}")
    return value


@dataclass
class DataConfig:
    """Where training pairs come from; validated on construction, every error names the field."""

    type: str  # "csv" | "webdataset" | "synthetic"
    path: str | None = None  # CSV/TSV file; or shard pattern/URL list for webdataset (comma/`::`-separated)
    image_column: str = "filepath"
    caption_column: str = "title"
    separator: str | None = None  # default: tab for .tsv, comma otherwise
    num_samples: int | None = None  # synthetic: size (default 10000); webdataset: samples per epoch; csv: unused
    num_workers: int = 2
    image_root: str | None = None  # csv: folder image paths are relative to (default: the table's folder)
    split: str | None = None  # csv: keep only rows whose split_column equals this, e.g. "train"
    split_column: str = "split"
    resize_ratio: float = 1.0  # train crop: shorter side resized to ratio * image_size, then a random square crop
    seed: int = 0  # synthetic content seed
    resampled: bool = False  # webdataset: draw shards with replacement, forever (open_clip's --dataset-resampled)
    upsampling_factors: list[float] | str | None = None  # resampled: weight per '::' source, e.g. "1::2" or [1, 2]
    source_names: list[str] | str | None = None  # webdataset: names in Batch.source_counts (default source0, ...)

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ConfigError(f"data.type must be one of {', '.join(TYPES)}, got {self.type!r}")
        if self.path is not None and not isinstance(self.path, str):
            self.path = str(self.path)  # a pathlib.Path is fine
        if self.type in ("csv", "webdataset") and not (self.path or "").strip():
            example = "train.csv" if self.type == "csv" else "shards/{00000..00127}.tar"
            raise ConfigError(f"data.path is required for data.type '{self.type}', e.g. data.path = \"{example}\"")
        for name in ("image_column", "caption_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"data.{name} must be a non-empty column name, got {value!r}")
        if self.separator is not None:
            self.separator = _SEPARATOR_ALIASES.get(self.separator, self.separator)
            if not isinstance(self.separator, str) or len(self.separator) != 1:
                raise ConfigError(f"data.separator must be one character (or 'tab'), got {self.separator!r}")
        if self.num_samples is not None:
            _int_field("num_samples", self.num_samples, 1)
            if self.type == "synthetic" and self.num_samples > EVAL_OFFSET:
                raise ConfigError(f"data.num_samples must be <= {EVAL_OFFSET} for synthetic data (higher indices "
                                  "are the held-out eval split)")
        elif self.type == "synthetic":
            self.num_samples = DEFAULT_SYNTHETIC_SAMPLES
        elif self.type == "webdataset":
            raise ConfigError("data.num_samples is required for data.type 'webdataset' (samples per epoch; "
                              "streamed shards have no length), e.g. data.num_samples = 1000000")
        _int_field("num_workers", self.num_workers, 0)
        _int_field("seed", self.seed, None)
        if isinstance(self.resize_ratio, bool) or not isinstance(self.resize_ratio, (int, float)) \
                or not 1.0 <= self.resize_ratio <= 4.0:
            raise ConfigError(f"data.resize_ratio must be a number in [1, 4] (1 = crop only along the longer "
                              f"side), got {self.resize_ratio!r}")
        self.resampled, self.upsampling_factors, self.source_names = check_source_fields(
            self.type, self.path, self.resampled, self.upsampling_factors, self.source_names)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """From a config table (TOML/JSON/CLI overrides); a list of shard URLs is joined with '::'."""
        if not isinstance(d, dict):
            raise ConfigError(f"data must be a table such as {{type = \"csv\", path = \"train.csv\"}}, got {d!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"data.{unknown[0]} is not a known field; known fields are: {', '.join(known)}")
        if "type" not in d:
            raise ConfigError(f"data.type is required: one of {', '.join(TYPES)}")
        values = dict(d)
        if isinstance(values.get("path"), (list, tuple)):
            values["path"] = "::".join(str(p) for p in values["path"])
        return cls(**values)


@dataclass
class Batch:
    images: torch.Tensor  # [b, 3, S, S] float32; b < the local batch size when samples were dropped
    texts: torch.Tensor  # [b, context_length] token ids
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of ``skips``
    skips: list[SkipRecord] = field(default_factory=list)  # bad samples this batch reports (see module doc)
    unused: int = 0  # good samples cut so that every rank's batch has the same size
    source_counts: dict[str, int] = field(default_factory=dict)  # webdataset: samples per source name
    position: dict[str, Any] | None = None  # webdataset: the stream after this batch (resume); None: map-style

    def __len__(self) -> int:
        return self.images.shape[0]


class TrainData:
    """What the training loop iterates: ``steps_per_epoch`` global batches per epoch (drop_last)."""

    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0, position: dict[str, Any] | None = None) -> Iterator[Batch]:
        """This rank's share of each global batch of ``epoch``, from ``start_step`` on.

        ``position``: ``Batch.position`` of batch ``start_step - 1`` (streamed sources need it to resume exactly).
        """
        raise NotImplementedError


class MapSource(Protocol):
    problems: dict[int, str]  # row -> reason, for rows known bad without decoding

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, str]:
        """The image and caption of row ``index``; raises ``BadSample(reason)`` for a bad row."""
        ...

    def name(self, index: int) -> tuple[str, str]:
        """(source, detail): how row ``index`` is named in skip records."""
        ...


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (``hash`` is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def crop_with_seed(transform: ImageTransform, image: Image.Image, seed: int) -> torch.Tensor:
    """Apply the train transform with a generator of its own, so the crop depends on the sample only."""
    transform.generator = torch.Generator().manual_seed(seed)
    try:
        return transform(image)
    finally:
        transform.generator = None


def add_counts(into: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    for reason, count in counts.items():
        into[reason] = into.get(reason, 0) + count
    return into


def _identity(item: Any) -> Any:  # module level so DataLoader workers can pickle it
    return item


def min_across_ranks(size: int) -> int:
    """The smallest ``size`` over all ranks (``all_reduce(MIN)``); ``size`` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return size
    nccl = dist.get_backend() == "nccl"
    value = torch.tensor([size], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


_Item = tuple[int, int, int, bool]  # (epoch, position in the epoch, row, train on it: False = only check it)


class _MapDataset(Dataset):
    """Builds whole batches (``__getitems__``); a sample that fails to decode is dropped and recorded."""

    def __init__(self, source: MapSource, image_size: int, context_length: int, seed: int,
                 resize_ratio: float = 1.0) -> None:
        self.source = source
        self.transform = image_transform(image_size, train=True, resize_ratio=resize_ratio)
        self.context_length = context_length
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, items: list[_Item]) -> Batch:
        size = self.transform.image_size
        images = torch.empty(sum(i[3] for i in items), 3, size, size)  # filled in place: no torch.stack copy
        captions: list[str] = []
        skips: list[SkipRecord] = []
        for epoch, position, row, train in items:
            try:
                image, caption = self.source.load(row)
                # The crop belongs to the position, so a resumed run draws the same pixels.
                pixels = crop_with_seed(self.transform, image, sample_seed(self.seed, epoch, position))
            except BadSample as bad:
                reason = bad.reason
            except Exception:  # noqa: BLE001 (any decoder or transform failure is a bad image, never a dead run)
                reason = UNREADABLE_IMAGE
            else:
                if train:
                    images[len(captions)] = pixels
                    captions.append(caption)
                continue
            source, detail = self.source.name(row)
            skips.append(SkipRecord(epoch, source, reason, detail))
        if len(captions) < images.shape[0]:
            images = images[:len(captions)].clone()
        return Batch(images, tokenize(captions, self.context_length, truncate=True), count_reasons(skips), skips)

    def __getitem__(self, item: _Item) -> Batch:
        return self.__getitems__([item])


@dataclass
class _StepSampler:
    """Lazy batch sampler: rank r of step s takes positions s*G + r*b ... s*G + (r+1)*b - 1 of the order.

    The last step also lists this rank's share of the rows past the last full batch, to check only.
    """

    order: torch.Tensor  # the epoch's permutation of usable rows, the same on every rank
    epoch: int
    start_step: int
    steps: int
    global_batch_size: int
    local_batch_size: int
    rank: int
    world_size: int

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self) -> Iterator[list[_Item]]:
        for step in range(self.start_step, self.steps):
            first = step * self.global_batch_size + self.rank * self.local_batch_size
            rows = self.order[first:first + self.local_batch_size].tolist()
            items = [(self.epoch, first + k, row, True) for k, row in enumerate(rows)]
            if step == self.steps - 1:
                tail = range(self.steps * self.global_batch_size + self.rank, len(self.order), self.world_size)
                items += [(self.epoch, p, int(self.order[p]), False) for p in tail]
            yield items


class MapTrainData(TrainData):
    """Exact, resumable batches over a map-style source (see the module docstring)."""

    def __init__(self, dataset: _MapDataset, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int) -> None:
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        problems = dataset.source.problems
        self.usable = torch.arange(len(dataset))
        if problems:
            keep = torch.ones(len(dataset), dtype=torch.bool)
            keep[list(problems)] = False
            self.usable = self.usable[keep]
            if len(self.usable) == 0:
                where = getattr(dataset.source, "path", "data.path")
                raise ClipforgeError(f"the training data is unusable: all {len(dataset)} rows of {where} are bad "
                                     f"({format_counts(count_reasons(self.known_bad(0)))}); check data.path, the "
                                     "columns, data.image_root and the image files")
        self.steps_per_epoch = len(self.usable) // global_batch_size
        # Ranks must agree on each step's batch size (see the module docstring); one process needs nothing.
        self.agree: Callable[[int], int] | None = min_across_ranks if world_size > 1 else None

    def known_bad(self, epoch: int) -> list[SkipRecord]:
        """Records of the rows that are bad before any image is decoded (reported once per epoch)."""
        source = self.dataset.source
        return [SkipRecord(epoch, *_named(source, row, reason)) for row, reason in sorted(source.problems.items())]

    def batch_items(self, epoch: int, start_step: int = 0) -> _StepSampler:
        """The batch sampler: per step, (epoch, position, row, train) for each of this rank's samples."""
        permutation = torch.randperm(len(self.usable), generator=torch.Generator().manual_seed(self.seed + epoch))
        return _StepSampler(self.usable[permutation], epoch, start_step, self.steps_per_epoch,
                            self.global_batch_size, self.local_batch_size, self.rank, self.world_size)

    def batches(self, epoch: int, start_step: int = 0, position: dict[str, Any] | None = None) -> Iterator[Batch]:
        """Under torch.distributed every rank must iterate this in step (one all_reduce per batch).

        ``position`` is ignored: step ``start_step`` alone pins a map-style batch down.
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if start_step >= self.steps_per_epoch:
            return
        sampler = self.batch_items(epoch, start_step)
        # Own generator: DataLoader draws its worker base seed from it instead of torch's global RNG,
        # so iterating the data never shifts the training RNG state.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            collate_fn=_identity, pin_memory=False, persistent_workers=False,
                            generator=torch.Generator().manual_seed(sample_seed("loader", self.seed, epoch)))
        empty_in_a_row, limit = 0, max(1, -(-MAX_CONSECUTIVE_BAD // self.local_batch_size))
        for step, batch in zip(range(start_step, self.steps_per_epoch), loader):
            if step == 0 and self.rank == 0 and self.dataset.source.problems:
                batch.skips = self.known_bad(epoch) + batch.skips
                batch.skipped = count_reasons(batch.skips)
            size = self.agree(len(batch)) if self.agree is not None else len(batch)
            if size < len(batch):
                batch.unused = len(batch) - size
                batch.images, batch.texts = batch.images[:size].clone(), batch.texts[:size].clone()
            empty_in_a_row = empty_in_a_row + 1 if size == 0 else 0
            if empty_in_a_row >= limit:  # the same on every rank: the size is agreed
                raise ClipforgeError(f"the training data is unusable: {empty_in_a_row} steps in a row up to step "
                                     f"{step} of epoch {epoch} have no image that decodes (last: "
                                     f"{batch.skips[-1].detail if batch.skips else '?'}); check the image files")
            yield batch


def _named(source: MapSource, row: int, reason: str) -> tuple[str, str, str]:
    name, detail = source.name(row)
    return name, reason, detail


def check_batch_sizes(global_batch_size: int, rank: int, world_size: int) -> None:
    for name, value, low in (("global_batch_size", global_batch_size, 1), ("world_size", world_size, 1),
                             ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if rank >= world_size:
        raise ConfigError(f"rank must be < world_size ({world_size}), got {rank}")
    if global_batch_size % world_size:
        raise ConfigError(f"global_batch_size ({global_batch_size}) must be divisible by world_size "
                          f"({world_size}) so every rank gets a batch of the same size")


def build_train_data(config: DataConfig, *, image_size: int, context_length: int, global_batch_size: int,
                     rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainData:
    """The training data for one rank; ``seed`` is the run's seed (order and crops)."""
    check_batch_sizes(global_batch_size, rank, world_size)
    if config.type == "webdataset":
        from clipforge.data.webdataset_source import WebDatasetTrainData

        return WebDatasetTrainData(config, image_size=image_size, context_length=context_length,
                                   global_batch_size=global_batch_size, rank=rank, world_size=world_size, seed=seed)
    source: MapSource
    if config.type == "csv":
        source = CsvSource(config.path, image_column=config.image_column, caption_column=config.caption_column,
                           separator=config.separator, image_root=config.image_root, split=config.split,
                           split_column=config.split_column)
    else:
        source = SyntheticCaptions(config.seed, config.num_samples, size=max(64, image_size))
    dataset = _MapDataset(source, image_size, context_length, seed, resize_ratio=config.resize_ratio)
    return MapTrainData(dataset, global_batch_size=global_batch_size, rank=rank, world_size=world_size, seed=seed,
                        num_workers=config.num_workers)
