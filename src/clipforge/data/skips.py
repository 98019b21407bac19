"""Bad samples: the reason names every part of clipforge counts under, one record per skipped sample, a ledger.

Training (CSV and WebDataset sources), ``make-shards`` and evaluation use these names, so the same bad
input is reported the same way everywhere. A skipped sample is a ``SkipRecord(epoch, source, reason,
detail)``: ``source`` names it uniquely (``/abs/train.csv:17`` for a table row, ``shard.tar/key`` for a
shard member, the shard itself when the shard is broken), ``detail`` is for people (the image path or
the error). ``SkipLedger`` counts each source once per epoch, however many workers, passes, ranks or
resumed replays report it, and survives a resume through ``state_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "BAD_UTF8", "CORRUPT_SHARD", "EMPTY_CAPTION", "MALFORMED_ROW", "MISSING_CAPTION", "MISSING_FILE",
    "MISSING_IMAGE", "MISSING_SHARD", "REASONS", "UNREADABLE_IMAGE", "SkipLedger", "SkipRecord", "count_reasons",
    "format_counts", "gather_records", "read_skipped_tsv", "write_skipped_tsv",
]

MISSING_FILE = "missing_file"  # the image file a row names is not there (or is a dangling link)
UNREADABLE_IMAGE = "unreadable_image"  # the file or shard member is there but does not decode as an image
MISSING_IMAGE = "missing_image"  # the row has no image path, or the shard member has no image
MISSING_CAPTION = "missing_caption"  # the shard member has no .txt
EMPTY_CAPTION = "empty_caption"  # the caption is empty or only whitespace
BAD_UTF8 = "bad_utf8"  # the caption is not valid UTF-8
MALFORMED_ROW = "malformed_row"  # the table row lacks the image or caption column, or cannot be parsed
CORRUPT_SHARD = "corrupt_shard"  # a tar shard is truncated or not a tar: the rest of it is skipped
MISSING_SHARD = "missing_shard"  # a shard named by data.path cannot be opened
REASONS = {
    MISSING_FILE: "missing file", UNREADABLE_IMAGE: "unreadable image", MISSING_IMAGE: "no image",
    MISSING_CAPTION: "no caption", EMPTY_CAPTION: "empty caption", BAD_UTF8: "caption not UTF-8",
    MALFORMED_ROW: "malformed row", CORRUPT_SHARD: "truncated or corrupt shard", MISSING_SHARD: "missing shard",
}
TSV_HEADER = ("source", "reason", "detail")


class SkipRecord(NamedTuple):
    """One skipped sample (or broken shard) in one epoch."""

    epoch: int
    source: str
    reason: str
    detail: str = ""


def count_reasons(records: Iterable[SkipRecord]) -> dict[str, int]:
    """{reason: how many}, sorted by reason."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.reason] = counts.get(record.reason, 0) + 1
    return dict(sorted(counts.items()))


def format_counts(counts: dict[str, int]) -> str:
    """'bad_utf8=2, missing_file=3', or 'none' (for one-line summaries)."""
    return ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items())) or "none"


class SkipLedger:
    """Counts by reason, each source once per epoch; remembers every bad source of the run.

    Dedup is what makes the counts exact: a WebDataset epoch may read a shard twice (two passes, or
    two ranks), and a resumed run replays the steps after its last checkpoint. Only the current and
    previous epoch keep their sets of sources (records arrive in epoch order), so the state stays the
    size of the bad data, not of bad data times epochs.
    """

    def __init__(self) -> None:
        self._sources: dict[str, tuple[str, str, int]] = {}  # source -> (reason, detail, first epoch)
        self._epochs: dict[int, dict[str, int]] = {}  # epoch -> reason -> count
        self._open: dict[int, set[str]] = {}  # epoch -> sources already counted in it

    def add(self, records: Iterable[SkipRecord]) -> dict[str, int]:
        """Count the records not yet counted in their epoch; returns the newly counted, by reason."""
        new: dict[str, int] = {}
        for record in sorted(records, key=lambda r: r.epoch):  # stable: all ranks' records of a window
            epoch = int(record.epoch)
            if self._open and epoch < min(self._open):
                continue  # an epoch already closed: only a replay can report it again
            seen = self._open.setdefault(epoch, set())
            if record.source in seen:
                continue
            seen.add(record.source)
            counts = self._epochs.setdefault(epoch, {})
            counts[record.reason] = counts.get(record.reason, 0) + 1
            new[record.reason] = new.get(record.reason, 0) + 1
            self._sources.setdefault(record.source, (record.reason, record.detail, epoch))
        for epoch in [e for e in self._open if e < max(self._open) - 1]:
            del self._open[epoch]
        return new

    def counts(self) -> dict[str, int]:
        """Cumulative counts over every epoch so far, by reason."""
        total: dict[str, int] = {}
        for counts in self._epochs.values():
            for reason, count in counts.items():
                total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    def epoch_counts(self, epoch: int) -> dict[str, int]:
        return dict(sorted(self._epochs.get(epoch, {}).items()))

    def records(self) -> list[SkipRecord]:
        """Every bad source of the run, once, in the order first met (epoch = the first epoch it was met)."""
        return [SkipRecord(epoch, source, reason, detail) for source, (reason, detail, epoch) in self._sources.items()]

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, strings and ints: loads with ``torch.load(weights_only=True)``."""
        index = {source: i for i, source in enumerate(self._sources)}
        return {"version": 1,
                "sources": [[s, r, d, e] for s, (r, d, e) in self._sources.items()],
                "epochs": [[e, r, c] for e, counts in sorted(self._epochs.items()) for r, c in sorted(counts.items())],
                "open": [[e, sorted(index[s] for s in seen)] for e, seen in sorted(self._open.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sources = [(str(s), str(r), str(d), int(e)) for s, r, d, e in state.get("sources", [])]
        self._sources = {s: (r, d, e) for s, r, d, e in sources}
        self._epochs = {}
        for epoch, reason, count in state.get("epochs", []):
            self._epochs.setdefault(int(epoch), {})[str(reason)] = int(count)
        self._open = {int(e): {sources[i][0] for i in members} for e, members in state.get("open", [])}


def gather_records(records: list[SkipRecord]) -> list[SkipRecord]:
    """Every rank's records on every rank (``all_gather_object``); the list itself in one process.

    Call it on all ranks at the same point (a collective), e.g. right before logging or saving.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(records)
    parts: list[list[SkipRecord]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, [tuple(r) for r in records])
    return [SkipRecord(*r) for part in parts for r in part]


def _escape(text: str) -> str:
    """TSV-safe: backslash, tab, CR and LF escaped; an undecodable byte (a surrogate) as \\xNN."""
    out = []
    for char in str(text):
        code = ord(char)
        if char in "\\\t\n\r":
            out.append({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}[char])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(char)
    return "".join(out)


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x" and i + 4 <= len(text):
                out.append(chr(0xDC00 + int(text[i + 2:i + 4], 16)))
                i += 4
                continue
            out.append({"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def write_skipped_tsv(records: Iterable[SkipRecord], path: str | os.PathLike) -> Path:
    """``source<TAB>reason<TAB>detail``, one line per record, escaped; written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(TSV_HEADER)] + ["\t".join(_escape(v) for v in (r.source, r.reason, r.detail))
                                       for r in records]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_skipped_tsv(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(source, reason, detail) rows of a ``write_skipped_tsv`` file, unescaped."""
    rows = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(_unescape(v) for v in (row.split("\t") + ["", ""])[:3]) for row in rows if row]  # type: ignore[misc]
