"""One interface for every training source: ``build_train_data(config, ...) -> TrainData`` of ``Batch``es.

Map-style sources (CSV, synthetic) are exact: step ``s`` of epoch ``e`` holds the same rows and the
same pixels whatever the number of ranks or workers, because the order comes from a permutation
seeded by ``seed + epoch`` and each random crop from ``(seed, epoch, position in the epoch)``. So a
resumed or re-sharded run is bit-identical to an uninterrupted one. WebDataset shards stream
instead (``webdataset_source.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipforge.data.csv_dataset import BadSample, CsvSource
from clipforge.data.synthetic import EVAL_OFFSET, SyntheticCaptions
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.tokenizer import tokenize
from clipforge.transforms import ImageTransform, image_transform

TYPES = ("csv", "webdataset", "synthetic")
DEFAULT_SYNTHETIC_SAMPLES = 10_000
MAX_CONSECUTIVE_BAD = 1000  # more bad samples in a row than this means the data, not a file, is broken
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
    images: torch.Tensor  # [b, 3, S, S] float32
    texts: torch.Tensor  # [b, context_length] token ids
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> bad samples met building THIS batch


class TrainData:
    """What the training loop iterates: ``steps_per_epoch`` global batches per epoch (drop_last)."""

    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's share of each global batch of ``epoch``, from ``start_step`` on."""
        raise NotImplementedError


class MapSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, str]:
        """The image and caption of row ``index``; raises ``BadSample(reason)`` for a bad row."""
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


@dataclass
class _Failure:
    """Returned (not raised) by a worker, so the error reaches the user as one sentence."""

    message: str


def _identity(item: Any) -> Any:  # module level so DataLoader workers can pickle it
    return item


class _MapDataset(Dataset):
    """Builds whole batches (``__getitems__``) and swaps each bad sample for the next good one."""

    def __init__(self, source: MapSource, image_size: int, context_length: int, seed: int,
                 resize_ratio: float = 1.0) -> None:
        self.source = source
        self.transform = image_transform(image_size, train=True, resize_ratio=resize_ratio)
        self.context_length = context_length
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def _good_sample(self, epoch: int, position: int, index: int, skipped: dict[str, int]) -> tuple[torch.Tensor, str]:
        n = len(self.source)
        limit = min(MAX_CONSECUTIVE_BAD, n)
        last = ""
        for attempt in range(limit):
            row = (index + attempt) % n
            try:
                image, caption = self.source.load(row)
                # The crop belongs to the slot (position), not the row: a replacement row gets a fresh crop.
                return crop_with_seed(self.transform, image, sample_seed(self.seed, epoch, position)), caption
            except BadSample as bad:
                reason, last = bad.reason, str(bad)
            except Exception as error:  # noqa: BLE001 (any decoder failure is a bad image, never a dead run)
                reason, last = "unreadable_image", f"row {row}: {type(error).__name__}: {error}"
            skipped[reason] = skipped.get(reason, 0) + 1
        raise ClipforgeError(f"the training data is unusable: {limit} samples in a row from row {index} are bad "
                             f"(last: {last}); check data.path, the columns and the image files")

    def __getitems__(self, items: list[tuple[int, int, int]]) -> Batch | _Failure:
        skipped: dict[str, int] = {}
        size = self.transform.image_size
        images = torch.empty(len(items), 3, size, size)  # filled in place: no second copy as torch.stack makes
        captions = []
        try:
            for slot, (epoch, position, index) in enumerate(items):
                pixels, caption = self._good_sample(epoch, position, index, skipped)
                images[slot] = pixels
                captions.append(caption)
        except ClipforgeError as error:
            return _Failure(str(error))
        return Batch(images, tokenize(captions, self.context_length, truncate=True), skipped)

    def __getitem__(self, item: tuple[int, int, int]) -> Batch | _Failure:
        return self.__getitems__([item])


@dataclass
class _StepSampler:
    """Lazy batch sampler: rank r of step s takes positions s*G + r*b ... s*G + (r+1)*b - 1 of the order."""

    order: torch.Tensor  # the epoch's permutation of rows, the same on every rank
    epoch: int
    start_step: int
    steps: int
    global_batch_size: int
    local_batch_size: int
    rank: int

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start_step, self.steps):
            first = step * self.global_batch_size + self.rank * self.local_batch_size
            rows = self.order[first:first + self.local_batch_size].tolist()
            yield [(self.epoch, first + k, row) for k, row in enumerate(rows)]


class MapTrainData(TrainData):
    """Exact, resumable batches over a map-style source (see the module docstring)."""

    def __init__(self, dataset: _MapDataset, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int) -> None:
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.steps_per_epoch = len(dataset) // global_batch_size

    def batch_items(self, epoch: int, start_step: int = 0) -> _StepSampler:
        """The batch sampler: per step, (epoch, position, row) for each of this rank's samples."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        return _StepSampler(order, epoch, start_step, self.steps_per_epoch, self.global_batch_size,
                            self.local_batch_size, self.rank)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
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
        for item in loader:
            if isinstance(item, _Failure):
                raise ClipforgeError(item.message)
            yield item


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
