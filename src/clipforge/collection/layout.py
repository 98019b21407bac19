"""clip-retrieval's embedding layout on disk, so its tools, autofaiss and embedding-reader read ours unchanged.

    OUT/img_emb/img_emb_{N}.npy          [rows, D] L2-normalised, float16 (or float32)
    OUT/text_emb/text_emb_{N}.npy        row-aligned with the images when both are embedded
    OUT/metadata/metadata_{N}.parquet    image_path, caption, size, mtime: row i describes row i of part N
    OUT/embed_info.json                  what made the collection and what was skipped (EmbedInfo)
    OUT/skipped.tsv                      every skipped input, named, with its reason

``N`` is zero-padded to the digit count of the number of parts, exactly as clip-retrieval's writer
does (``str(n).zfill(len(str(parts)))``), so name order is part order for every tool that sorts
file names. A part is written atomically and its parquet last: a parquet marks a finished part. Each
parquet also carries (in its schema metadata, which other readers ignore) what made it: the digest
of its inputs and settings, and its skipped inputs, so a rerun can tell a finished part from a
stale one and any process can rebuild ``embed_info.json`` from the parts alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.checkpoints.atomic import atomic_write
from clipforge.errors import ClipforgeError

__all__ = ["EMB_DIRS", "INFO_NAME", "KINDS", "METADATA_COLUMNS", "METADATA_DIR", "SKIPPED_NAME", "EmbedInfo",
           "PartFiles", "list_parts", "part_meta", "read_embeddings", "require_pyarrow", "scan_parts",
           "write_part"]

KINDS = ("img", "text")
EMB_DIRS = {"img": "img_emb", "text": "text_emb"}
METADATA_DIR = "metadata"
INFO_NAME = "embed_info.json"
SKIPPED_NAME = "skipped.tsv"
METADATA_COLUMNS = ("image_path", "caption", "size", "mtime")
META_KEY = b"clipforge"  # parquet schema-metadata key of a part's provenance (JSON)
_PART_FILE = re.compile(r"^(img_emb|text_emb|metadata)_(\d+)\.(npy|parquet)$")
_PART_TEMP = re.compile(r"^\.(img_emb|text_emb|metadata)_(\d+)\.(npy|parquet)\.tmp-[a-z0-9_]{8}$")
_PREFIX_KIND = {"img_emb": "img", "text_emb": "text", "metadata": "metadata"}


def require_pyarrow():
    """pyarrow (an optional extra): imported on first use, with the install command when it is missing."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ClipforgeError("embedding collections needs pyarrow, which is not installed; "
                             "pip install 'clipforge[search]'") from None
    return pyarrow


def _schema():
    pa = require_pyarrow()
    return pa.schema([("image_path", pa.string()), ("caption", pa.string()), ("size", pa.int64()),
                      ("mtime", pa.float64())])


@dataclasses.dataclass
class PartFiles:
    """The files of part ``n`` present on disk (an embedding file by kind, the parquet or None)."""

    n: int
    metadata: Path | None = None
    embeddings: dict[str, Path] = dataclasses.field(default_factory=dict)


def scan_parts(folder: str | os.PathLike) -> dict[int, PartFiles]:
    """Every part file in folder by part number, whatever its zero-padding (finished or not)."""
    folder = Path(folder)
    parts: dict[int, PartFiles] = {}
    for sub in (*EMB_DIRS.values(), METADATA_DIR):
        try:
            names = os.listdir(folder / sub)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            match = _PART_FILE.match(name)
            if match is None or match.group(1) != sub or (match.group(3) == "parquet") != (sub == METADATA_DIR):
                continue
            part = parts.setdefault(int(match.group(2)), PartFiles(int(match.group(2))))
            if sub == METADATA_DIR:
                part.metadata = folder / sub / name
            else:
                part.embeddings[_PREFIX_KIND[sub]] = folder / sub / name
    return dict(sorted(parts.items()))


def list_parts(folder: str | os.PathLike) -> list[int]:
    """Numbers of the finished parts (their parquet, written last, is there), ascending."""
    return [n for n, files in scan_parts(folder).items() if files.metadata is not None]


def temp_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(part, path) of temporaries a killed writer left in the part folders."""
    found = []
    for sub in (*EMB_DIRS.values(), METADATA_DIR):
        try:
            names = os.listdir(Path(folder) / sub)
        except (FileNotFoundError, NotADirectoryError):
            continue
        found += [(int(m.group(2)), Path(folder) / sub / name) for name in names if (m := _PART_TEMP.match(name))]
    return found


def part_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance JSON clipforge stored in a part's parquet, or None (not ours, or unreadable)."""
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[META_KEY]) if META_KEY in metadata else None
    except Exception:  # noqa: BLE001 (a damaged file is simply not a finished part)
        return None


def npy_rows(path: str | os.PathLike) -> int | None:
    """Row count from a .npy header alone, or None when the file is damaged."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)  # the header only: no data is read
            return int(shape[0]) if len(shape) == 2 else None
    except Exception:  # noqa: BLE001
        return None


def part_name(n: int, width: int) -> str:
    """clip-retrieval's part suffix: n zero-padded to width digits."""
    return str(n).zfill(width)


def _rows_table(metadata_rows: Any):
    pa = require_pyarrow()
    schema = _schema()
    if isinstance(metadata_rows, pa.Table):
        columns = {c: metadata_rows.column(c) if c in metadata_rows.column_names else pa.nulls(len(metadata_rows))
                   for c in METADATA_COLUMNS}
        return pa.table([columns[c].cast(schema.field(c).type) for c in METADATA_COLUMNS], schema=schema)
    rows = list(metadata_rows)
    return pa.table({c: [row.get(c) for row in rows] for c in METADATA_COLUMNS}, schema=schema)


def write_part(folder: str | os.PathLike, n: int, embeddings: np.ndarray | Mapping[str, np.ndarray],
               metadata_rows: Sequence[Mapping[str, Any]] | Any, kind: str = "img", *, width: int | None = None,
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write part n: the embeddings (one array of ``kind``, or {kind: array} for row-aligned kinds), then its
    metadata parquet; each file atomically, the parquet last so that its presence marks a finished part.

    ``width``: the zero-padding of the names (clip-retrieval's: digits of the part count); by default that
    of the parts already there, widened for n. ``meta``: provenance kept in the parquet's schema metadata.
    Returns the parquet path.
    """
    require_pyarrow()
    import pyarrow.parquet as pq

    folder = Path(folder)
    given = dict(embeddings) if isinstance(embeddings, Mapping) else {kind: embeddings}
    arrays = {name: np.asarray(array) for name, array in given.items()}
    table = _rows_table(metadata_rows)
    for name, array in arrays.items():
        if name not in KINDS:
            raise ClipforgeError(f"kind must be one of {', '.join(KINDS)}, got {name!r}")
        if array.ndim != 2 or array.shape[0] != table.num_rows:
            raise ClipforgeError(f"part {n}: {name} embeddings have shape {tuple(array.shape)} but the metadata has "
                                 f"{table.num_rows} rows; each embedding row needs one metadata row")
    if width is None:
        existing = [f for files in scan_parts(folder).values() for f in [files.metadata, *files.embeddings.values()]
                    if f is not None]
        width = max([len(str(n))] + [len(_PART_FILE.match(f.name).group(2)) for f in existing])  # type: ignore[union-attr]
    suffix = part_name(n, width)
    for name, array in arrays.items():
        target = folder / EMB_DIRS[name] / f"{EMB_DIRS[name]}_{suffix}.npy"

        def save(tmp: Path, array: np.ndarray = array) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary's name
                np.save(f, np.ascontiguousarray(array))
        atomic_write(target, save)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(dict(meta), ensure_ascii=True).encode()})
    target = folder / METADATA_DIR / f"metadata_{suffix}.parquet"
    atomic_write(target, lambda tmp: pq.write_table(table, str(tmp)))
    return target


def read_embeddings(folder: str | os.PathLike, kind: str = "img", *,
                    dtype: Any = np.float32) -> tuple[np.ndarray, Any]:
    """(embeddings [rows, D], metadata pyarrow Table) of every finished part, concatenated in part order.

    ``dtype``: float32 by default (what faiss and matrix products want); None keeps the stored dtype.
    """
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    if kind not in KINDS:
        raise ClipforgeError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    folder = Path(folder)
    parts = [files for files in scan_parts(folder).values() if files.metadata is not None]
    if not parts:
        raise ClipforgeError(f"'{folder}' holds no finished embedding part ({METADATA_DIR}/metadata_N.parquet); "
                             "run clipforge embed into it first")
    arrays, tables = [], []
    for files in parts:
        path = files.embeddings.get(kind)
        if path is None:
            raise ClipforgeError(f"part {files.n} of '{folder}' has no {EMB_DIRS[kind]} file; the collection was "
                                 f"embedded without {'images' if kind == 'img' else 'texts'}")
        array = np.load(path, allow_pickle=False)
        table = pq.read_table(files.metadata).replace_schema_metadata(None)
        if array.ndim != 2 or array.shape[0] != table.num_rows:
            raise ClipforgeError(f"part {files.n} of '{folder}': {path.name} has {array.shape[0]} rows but its "
                                 f"metadata has {table.num_rows}; embed that part again (delete its files and rerun)")
        arrays.append(array if dtype is None else array.astype(dtype, copy=False))
        tables.append(table)
    return np.concatenate(arrays), pa.concat_tables(tables)


@dataclasses.dataclass
class EmbedInfo:
    """``embed_info.json``: what made the collection (as given on the command line) and what it holds."""

    model: str | None = None
    pretrained: str | None = None
    model_config: str | None = None
    quick_gelu: bool | None = None
    image_size: int | None = None
    embed_dim: int = 0
    dtype: str = "float16"
    part_size: int = 10000
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["img"])
    source: str = ""
    source_type: str = ""
    parts: int = 0  # the input is cut into this many parts
    parts_done: int = 0
    complete: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # items, img, text, skipped
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # by reason
    skipped_items: list[dict[str, str]] = dataclasses.field(default_factory=list)  # the first few; skipped.tsv: all
    precision: str = ""  # what computed the parts: fp32, bf16 (or both, when reruns differed)
    clipforge_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbedInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # newer files may add fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def write(self, folder: str | os.PathLike) -> Path:
        """Atomically, and only when the content changes (concurrent ranks then never race on it)."""
        target = Path(folder) / INFO_NAME
        text = self.to_json()
        try:
            if target.read_text(encoding="utf-8") == text:
                return target
        except (OSError, UnicodeDecodeError):
            pass
        return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))

    @classmethod
    def read(cls, folder: str | os.PathLike) -> EmbedInfo:
        path = Path(folder) / INFO_NAME
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ClipforgeError(f"'{folder}' has no {INFO_NAME}; it is not a finished clipforge embed output "
                                 "(rerun clipforge embed into it to finish it)") from None
        except (ValueError, TypeError) as error:
            raise ClipforgeError(f"'{path}' is not a valid {INFO_NAME} ({error}); rerun clipforge embed to "
                                 "rewrite it") from None
