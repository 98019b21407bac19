"""The bookkeeping that makes ``embed_collection`` resumable and rank-safe, kept apart from the embedding itself.

A part's parquet carries its provenance (inputs digest, settings digest, row count, skipped inputs), so
everything here is decided from the files alone: which parts are finished, which were made by other
settings (refused), what killed writers left behind (removed, each rank only for its own parts), and
the collection's ``embed_info.json`` and ``skipped.tsv`` (rebuilt from the parts).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipforge.checkpoints.atomic import atomic_write
from clipforge.collection import layout
from clipforge.collection.layout import (
    EMB_DIRS,
    INFO_NAME,
    METADATA_DIR,
    SKIPPED_NAME,
    EmbedInfo,
)
from clipforge.collection.sources import Source
from clipforge.data.skips import (
    SkipRecord,
    count_reasons,
    read_skipped_tsv,
    write_skipped_tsv,
)
from clipforge.errors import ClipforgeError

NAMED_IN_INFO = 1000  # skipped inputs named in embed_info.json; skipped.tsv names every one
_STALE_SECONDS = 60  # a temporary of embed_info.json / skipped.tsv older than this was left by a killed process


def write_skipped(path: Path, records: Sequence[SkipRecord]) -> None:
    """skipped.tsv, atomically and only when it changes (ranks that finish together never race on it)."""
    try:
        if [tuple(r[1:]) for r in records] == read_skipped_tsv(path):
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, lambda tmp: write_skipped_tsv(records, tmp))


def prepare_out(out: Path) -> Path:
    """The output folder, created; refused if it is a file or holds someone else's files."""
    if out.exists() and not out.is_dir():
        raise ClipforgeError(f"output '{out}' is a file; pass a folder (new, empty, or one clipforge embed wrote)")
    if out.is_dir():
        ours = {*EMB_DIRS.values(), METADATA_DIR, INFO_NAME, SKIPPED_NAME}
        others = sorted(name for name in os.listdir(out) if not name.startswith(".") and name not in ours)
        if others:
            raise ClipforgeError(f"output folder '{out}' holds other files ('{others[0]}'...); embed into a new or "
                                 "empty folder, or one clipforge embed wrote")
    return out


def clean(out: Path, rank: int, world: int, parts: int, total: int, info: Mapping[str, Any]) -> None:
    """Remove what killed writers left (temporaries, arrays without their parquet) and parts of a longer input,
    each for the parts this rank owns; and an embed_info.json that no longer describes the input."""
    for n, path in layout.temp_files(out):
        if n % world == rank:
            path.unlink(missing_ok=True)
    for n, files in layout.scan_parts(out).items():
        if n % world != rank or (files.metadata is not None and n < parts):
            continue
        if files.metadata is not None:
            files.metadata.unlink(missing_ok=True)  # first: the part is unfinished from here on
        for path in files.embeddings.values():
            path.unlink(missing_ok=True)
    now = time.time()
    for name in os.listdir(out):
        if name.startswith((f".{INFO_NAME}.tmp-", f".{SKIPPED_NAME}.tmp-")):
            path = out / name
            try:
                if now - path.stat().st_mtime > _STALE_SECONDS:  # a fresh one may be another rank's write
                    path.unlink(missing_ok=True)
            except OSError:
                pass
    try:
        old = json.loads((out / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if (old.get("parts"), old.get("counts", {}).get("items"), old.get("part_size"), old.get("kinds")) != \
            (parts, total, info["part_size"], info["kinds"]):
        (out / INFO_NAME).unlink(missing_ok=True)
        (out / SKIPPED_NAME).unlink(missing_ok=True)


def check_settings(out: Path, existing: Mapping[int, layout.PartFiles],
                    settings: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Provenance of every finished part; refuses (one sentence) parts that another model or setting made."""
    metas: dict[int, dict[str, Any]] = {}
    for n, files in existing.items():
        if files.metadata is None:
            continue
        meta = layout.part_meta(files.metadata)
        if meta is None:
            raise ClipforgeError(f"'{files.metadata}' was not written by clipforge embed (or is damaged); embed into "
                                 "a new folder, or delete that file to have the part embedded again")
        if meta.get("settings") != settings["digest"]:
            theirs, ours = meta.get("info", {}), settings["info"]
            differ = [f"{k} {theirs.get(k)!r} (now {ours[k]!r})" for k in ("model", "pretrained", "image_size",
                                                                           "embed_dim", "dtype", "kinds", "part_size")
                      if theirs.get(k) != ours[k]]
            raise ClipforgeError(f"'{out}' holds parts embedded with other settings ({'; '.join(differ) or 'other weights'}"
                                 "); embed into a new folder, or delete it to start over")
        metas[n] = meta
    return metas


def finished(files: layout.PartFiles | None, meta: Mapping[str, Any] | None, kinds: Sequence[str], digest: str,
              settings_digest: str) -> bool:
    """A part to keep: its parquet is there, made from these inputs and settings, with every array's rows."""
    if files is None or files.metadata is None or meta is None:
        return False
    if meta.get("digest") != digest or meta.get("settings") != settings_digest:
        return False
    return all(k in files.embeddings and layout.npy_rows(files.embeddings[k]) == meta.get("rows") for k in kinds)


def rename(files: layout.PartFiles, width: int) -> None:
    """A finished part named with another zero-padding (the part count changed digits) takes today's names."""
    suffix = layout.part_name(files.n, width)
    if files.metadata is None or files.metadata.name == f"metadata_{suffix}.parquet":
        return
    for kind, path in files.embeddings.items():
        os.replace(path, path.with_name(f"{EMB_DIRS[kind]}_{suffix}.npy"))
    os.replace(files.metadata, files.metadata.with_name(f"metadata_{suffix}.parquet"))  # last: marks it finished


def summary(out: Path, src: Source, parts: int, settings: Mapping[str, Any]) -> tuple[EmbedInfo, list[SkipRecord]]:
    """EmbedInfo and every skip record, rebuilt from the finished parts' provenance."""
    from clipforge import __version__

    info = dict(settings["info"])
    records = list(src.listing_skips)
    rows = done = 0
    precisions: set[str] = set()
    for n, files in layout.scan_parts(out).items():
        meta = layout.part_meta(files.metadata) if files.metadata is not None and n < parts else None
        if meta is None or meta.get("settings") != settings["digest"]:
            continue
        done += 1
        rows += int(meta.get("rows", 0))
        precisions.add(str(meta.get("precision", "")))
        records += [SkipRecord(0, *map(str, item)) for item in meta.get("skipped", [])]
    counts = {"items": len(src), **{k: rows for k in info["kinds"]}, "skipped": len(records)}
    named = [{"source": r.source, "reason": r.reason, "detail": r.detail} for r in records[:NAMED_IN_INFO]]
    return EmbedInfo(**{k: info[k] for k in ("model", "pretrained", "model_config", "quick_gelu", "image_size",
                                             "embed_dim", "dtype", "part_size", "source", "source_type")},
                     kinds=list(info["kinds"]), parts=parts, parts_done=done, complete=done == parts, counts=counts,
                     skipped=count_reasons(records), skipped_items=named, precision="+".join(sorted(precisions)),
                     clipforge_version=__version__), records
