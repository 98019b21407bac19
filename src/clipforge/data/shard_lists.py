"""Which shards a WebDataset source reads, and in which order each loader worker reads them.

``data.path`` holds one or more *sources* separated by ``::`` (as open_clip's ``--train-data``); a
source is a comma-separated list of shard URLs or brace patterns (``a/{00000..00099}.tar``). Sources
are named ``source0``, ``source1``, ... unless ``data.source_names`` names them; ``Batch.source_counts``
counts good samples under these names.

Without ``data.resampled``, each pass over the data shuffles all shards with ``(seed, epoch, pass)``,
rank ``r`` of ``W`` takes shards ``r, r+W, ...`` and logical worker ``w`` of ``N`` every ``N``-th of
those. With ``data.resampled``, each (rank, logical worker) draws shards with replacement, forever,
from ``random.Random`` seeded by ``(seed, epoch, rank, worker)``; a shard's weight is its source's
upsampling factor (open_clip's ``expand_urls``: a factor of 1 everywhere draws sources in proportion
to their shard counts).

This module imports no third-party package at import time: ``DataConfig`` validates with it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from clipforge.errors import ConfigError

__all__ = ["ShardList", "check_source_fields", "expand_shards", "pass_shards", "resampled_shards", "split_sources"]


def split_top_level(text: str) -> list[str]:
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


def split_sources(path: str) -> list[str]:
    """The '::'-separated sources of ``data.path`` (empty parts dropped)."""
    return [part.strip() for part in path.split("::") if part.strip()]


def expand_shards(path: str) -> list[str]:
    """Shard URLs/paths from a pattern such as 'a/{00000..00009}.tar,b/x.tar' (brace expansion by webdataset)."""
    import webdataset as wds

    urls: list[str] = []
    for part in split_top_level(path):
        urls.extend(wds.shardlists.expand_urls(part))
    return urls


def _number_list(name: str, value: Any) -> list[float]:
    """A list of positive numbers from a TOML list, one number, or a '::'-separated string such as '1::2'."""
    items = value.split("::") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    numbers = []
    for item in items:
        try:
            number = float(item.strip() if isinstance(item, str) else item)
            ok = not isinstance(item, bool) and math.isfinite(number) and number > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"data.{name} must be positive numbers, one per '::' source (e.g. \"1::2\" or "
                              f"[1, 2]), got {value!r}")
        numbers.append(number)
    return numbers


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ConfigError(f"data.{name} must be true or false, got {value!r}")
    return value


def check_source_fields(kind: str, path: str | None, resampled: Any, factors: Any,
                        names: Any) -> tuple[bool, list[float] | None, list[str] | None]:
    """``DataConfig``'s checks of resampled, upsampling_factors and source_names; returns them normalised."""
    resampled = _bool("resampled", resampled)
    if kind != "webdataset":
        for name, value in (("resampled", resampled), ("upsampling_factors", factors), ("source_names", names)):
            if value:
                raise ConfigError(f"data.{name} applies to data.type 'webdataset' only; remove it for '{kind}'")
        return resampled, None, None
    sources = split_sources(path or "")
    if factors is not None:
        factors = _number_list("upsampling_factors", factors)
        if not resampled:
            raise ConfigError("data.upsampling_factors weights shards drawn with replacement; set data.resampled = "
                              "true to use it (or remove it)")
        if len(factors) != len(sources):
            raise ConfigError(f"data.upsampling_factors has {len(factors)} value(s) but data.path has "
                              f"{len(sources)} '::'-separated source(s); give one factor per source")
    if names is not None:
        names = names.split("::") if isinstance(names, str) else names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError(f"data.source_names must be non-empty names, one per '::' source (e.g. \"laion::cc12m\" "
                              f"or [\"laion\", \"cc12m\"]), got {names!r}")
        names = [n.strip() for n in names]
        if len(names) != len(sources) or len(set(names)) != len(names):
            raise ConfigError(f"data.source_names must hold {len(sources)} distinct name(s), one per '::' source of "
                              f"data.path, got {names!r}")
    return resampled, factors, names


@dataclass(frozen=True)
class ShardList:
    """Every shard URL of ``data.path`` with its source and (resampled) weight."""

    urls: tuple[str, ...]
    sources: tuple[int, ...]  # index into names, per URL
    names: tuple[str, ...]
    weights: tuple[float, ...]  # per URL: its source's upsampling factor (1.0 without factors)

    @classmethod
    def from_path(cls, path: str, factors: list[float] | None = None,
                  names: list[str] | None = None) -> ShardList:
        urls: list[str] = []
        sources: list[int] = []
        parts = split_sources(path)
        for index, part in enumerate(parts):
            expanded = expand_shards(part)
            urls += expanded
            sources += [index] * len(expanded)
        names = list(names) if names else [f"source{i}" for i in range(len(parts))]
        factors = list(factors) if factors else [1.0] * len(parts)
        return cls(tuple(urls), tuple(sources), tuple(names), tuple(factors[s] for s in sources))

    def cumulative_weights(self) -> list[float]:
        return list(itertools.accumulate(self.weights))

    def shard(self, index: int, draw: int = 0) -> dict[str, Any]:
        return {"url": self.urls[index], "source": self.sources[index], "draw": draw}


def pass_shards(shards: ShardList, *, order_seed: int, rank: int, world_size: int, worker: int,
                workers: int) -> Iterator[dict[str, Any]]:
    """One logical worker's shards of one pass: all shuffled by ``order_seed`` (the same on every rank), split
    by rank, then by worker."""
    order = list(range(len(shards.urls)))
    random.Random(order_seed).shuffle(order)
    for draw, index in enumerate(order[rank::world_size][worker::workers]):
        yield shards.shard(index, draw)


def resampled_shards(shards: ShardList, *, draw_seed: int) -> Iterator[dict[str, Any]]:
    """Shards drawn with replacement by weight, forever; ``draw`` numbers them (a shard drawn twice differs)."""
    rng = random.Random(draw_seed)
    cumulative = shards.cumulative_weights()
    total = cumulative[-1]
    for draw in itertools.count():
        # What random.choices(cum_weights=...) draws, written out so that it cannot change under us.
        index = min(bisect.bisect(cumulative, rng.random() * total), len(cumulative) - 1)
        yield shards.shard(index, draw)
