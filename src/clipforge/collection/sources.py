"""What ``clipforge embed`` reads: an image folder tree, a CSV/TSV table, WebDataset shards (``shard_source``),
or a text file.

Every source is a fixed, ordered list of items known before any image is decoded (sorted relative
paths, table rows, shard members in shard order, text lines), so the list can be cut into parts that
are the same on every rerun and every rank. ``load(i)`` runs in DataLoader workers: it reads one
item and returns its image and/or caption and its metadata row, or raises ``Unusable`` with a
``clipforge.data.skips`` reason, so a bad input is skipped and named, never fatal.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.skips import (
    MALFORMED_ROW,
    MISSING_FILE,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    SkipRecord,
)
from clipforge.data.csv_dataset import caption_problem
from clipforge.errors import ClipforgeError, shorten, ImageError
from clipforge.transforms import load_image

__all__ = ["IMAGE_SUFFIXES", "ImageFolderSource", "ImageListSource", "Loaded", "Source", "TableSource",
           "TextFileSource", "Unusable", "open_source"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
IMAGE_COLUMNS = ("filepath", "image_path", "image", "path", "file", "filename")  # tried in order


class Unusable(Exception):
    """One item cannot be embedded; ``reason`` is a ``clipforge.data.skips`` name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, " ".join(str(detail).split())


@dataclass
class Loaded:
    """One item as a worker read it: the image (PIL) and caption asked for, and its metadata row."""

    image: Image.Image | None
    caption: str | None
    row: dict[str, Any]


def printable(text: str) -> str:
    """A name with undecodable bytes (surrogates) escaped: parquet and JSON hold only valid UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Source:
    """An ordered list of items; subclasses say how to name and read one."""

    source_type = ""
    kinds: tuple[str, ...] = ("img",)  # what it embeds: images, texts, or both row-aligned

    def __init__(self, spec: str) -> None:
        self.spec = str(spec)
        self.listing_skips: list[SkipRecord] = []  # inputs lost before there were items (a missing shard)

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A unique name of the item: in skip records, and hashed into its part's digest."""
        raise NotImplementedError

    def load(self, index: int, image: bool, text: bool) -> Loaded:
        raise NotImplementedError

    def digest(self, start: int, stop: int) -> str:
        """Fingerprint of items start..stop-1: a finished part is reused only if its inputs are the same."""
        h = hashlib.blake2b(digest_size=16)
        for index in range(start, stop):
            h.update(self.name(index).encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()


def _stat_file(path: str) -> os.stat_result:
    """os.stat of an image file, or Unusable naming why not: gone, a dangling link, a link loop, a folder."""
    try:
        result = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise Unusable(MISSING_FILE, f"{printable(path)}: {'dangling symbolic link' if dangling else 'no such file'}")
    except OSError as error:
        what = "symbolic link loop" if error.errno == errno.ELOOP else (error.strerror or str(error))
        raise Unusable(MISSING_FILE if error.errno == errno.ELOOP else UNREADABLE_IMAGE, f"{printable(path)}: {what}")
    if not os.path.isfile(path):
        raise Unusable(UNREADABLE_IMAGE, f"{printable(path)}: not a regular file")
    return result


def _load_file(path: str) -> tuple[Image.Image, dict[str, Any]]:
    stat = _stat_file(path)
    try:
        image = load_image(path)
    except ImageError as error:
        raise Unusable(UNREADABLE_IMAGE if os.path.exists(path) else MISSING_FILE, str(error)) from None
    return image, {"image_path": printable(path), "size": stat.st_size, "mtime": stat.st_mtime}


class ImageListSource(Source):
    """Image files in the order given (``embed_image_files``): no listing, no sorting."""

    source_type = "files"

    def __init__(self, paths: Sequence[str | os.PathLike], spec: str = "image files") -> None:
        super().__init__(spec)
        self.paths = [os.fspath(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int, image: bool = True, text: bool = False) -> Loaded:
        pixels, row = _load_file(self.paths[index])
        return Loaded(pixels, None, {**row, "caption": None})


class ImageFolderSource(ImageListSource):
    """Image files under a folder, recursively, by suffix; hidden files and folders left out; sorted by
    relative path. Links to folders are not followed (a loop would never end); links to files are read,
    and a dangling one or a loop is skipped and named when its turn comes."""

    source_type = "folder"

    def __init__(self, root: str | os.PathLike) -> None:
        root = os.path.abspath(os.fspath(root))
        found: list[str] = []
        for parent, folders, files in os.walk(root, onerror=None):
            folders[:] = [f for f in folders if not f.startswith(".")]
            found += [os.path.relpath(os.path.join(parent, f), root) for f in files
                      if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
        if not found:
            raise ClipforgeError(f"folder '{shorten(root)}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                                 "pass a folder of images, a CSV/TSV table or .tar shards")
        super().__init__([os.path.join(root, rel) for rel in sorted(found)], spec=root)
        self.root = root


def _read_table(path: Path, separator: str) -> tuple[list[str], list[tuple[int, list[str] | None]]]:
    """(header, [(line, fields or None when the row cannot be parsed)]) of a CSV/TSV file."""
    rows: list[tuple[int, list[str] | None]] = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=separator)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ClipforgeError(f"table '{shorten(path)}' is empty; it needs a header row naming its columns") from None
        except csv.Error as error:
            raise ClipforgeError(f"table '{shorten(path)}': cannot parse the header row ({error})") from None
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # e.g. a field over csv.field_size_limit(): that row only is bad
                rows.append((line, None))
                if reader.line_num == line - 1:
                    break
                continue
            if row:
                rows.append((line, row))
    return header, rows


class TableSource(Source):
    """Rows of a CSV/TSV file: an image path column (relative to the file's folder or ``image_root``) and/or
    a caption column. Images and captions of a row are embedded row-aligned, as clip-retrieval does."""

    source_type = "table"

    def __init__(self, path: str | os.PathLike, *, image_column: str | None = None,
                 caption_column: str | None = None, image_root: str | os.PathLike | None = None,
                 separator: str | None = None, images: bool = True) -> None:
        super().__init__(os.fspath(path))
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "does not exist"
            raise ClipforgeError(f"table '{shorten(path)}' {what}; pass a CSV or TSV file with a header row")
        self.table = os.path.abspath(self.path)
        sep = separator or ("\t" if self.path.suffix.lower() in (".tsv", ".tab") else ",")
        header, rows = _read_table(self.path, sep)
        columns = ", ".join(repr(h) for h in header)
        if images:
            if image_column is None:
                image_column = next((c for c in IMAGE_COLUMNS if c in header), None)
                if image_column is None:
                    raise ClipforgeError(f"table '{shorten(path)}' has none of the usual image columns "
                                         f"({', '.join(IMAGE_COLUMNS)}); its header has {columns}: pass "
                                         "--image-column NAME")
            elif image_column not in header:
                raise ClipforgeError(f"--image-column '{image_column}' is not a column of '{shorten(path)}'; its "
                                     f"header has {columns}")
        if caption_column is not None and caption_column not in header:
            raise ClipforgeError(f"--caption-column '{caption_column}' is not a column of '{shorten(path)}'; its "
                                 f"header has {columns}")
        if not images and caption_column is None:
            raise ClipforgeError(f"texts from the table '{shorten(path)}' need --caption-column naming the text "
                                 f"column; its header has {columns}")
        if image_root is not None and not os.path.isdir(image_root):
            raise ClipforgeError(f"--image-root '{shorten(image_root)}' is not a folder; point it at the folder the "
                                 "image paths are relative to")
        folder = os.path.abspath(image_root) if image_root is not None else os.path.dirname(self.table)
        image_at = header.index(image_column) if images else None
        caption_at = header.index(caption_column) if caption_column is not None else None
        self.kinds = (("img",) if images else ()) + (("text",) if caption_column is not None else ())
        self.lines: list[int] = []
        self.images: list[str | None] = []  # None: the row has no usable image field
        self.captions: list[str | None] = []
        for line, row in rows:
            self.lines.append(line)
            image = row[image_at].strip() if row is not None and image_at is not None and image_at < len(row) \
                else None
            self.images.append(os.path.join(folder, image) if image else ("" if image == "" else None))
            self.captions.append(row[caption_at] if row is not None and caption_at is not None
                                 and caption_at < len(row) else None)
        if not self.lines:
            raise ClipforgeError(f"table '{shorten(path)}' has a header but no rows")

    def __len__(self) -> int:
        return len(self.lines)

    def name(self, index: int) -> str:
        return f"{self.table}:{self.lines[index]}"

    def load(self, index: int, image: bool, text: bool) -> Loaded:
        caption = self.captions[index]
        if text:
            problem = caption_problem(caption)
            if problem is not None:
                raise Unusable(problem, f"caption {caption!r}" if caption is not None else "no caption field")
        row: dict[str, Any] = {"image_path": None, "caption": printable(caption) if caption is not None else None,
                               "size": None, "mtime": None}
        pixels = None
        if image:
            path = self.images[index]
            if path is None:
                raise Unusable(MALFORMED_ROW, "the row has no image field")
            if not path:
                raise Unusable(MISSING_IMAGE, "the image field is empty")
            pixels, file_row = _load_file(path)
            row.update(file_row)
        return Loaded(pixels, caption, row)


class TextFileSource(Source):
    """Texts, one per line of a UTF-8 file (a line that is not UTF-8 is skipped as bad_utf8, not fatal)."""

    source_type = "texts"
    kinds = ("text",)

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(os.fspath(path))
        if not os.path.isfile(path):
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            raise ClipforgeError(f"text file '{shorten(path)}' {what}; pass a file with one text per line")
        self.file = os.path.abspath(path)
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
            self.texts = f.read().splitlines()
        if not self.texts:
            raise ClipforgeError(f"text file '{shorten(path)}' is empty; it needs one text per line")

    def __len__(self) -> int:
        return len(self.texts)

    def name(self, index: int) -> str:
        return f"{self.file}:{index + 1}"

    def load(self, index: int, image: bool = False, text: bool = True) -> Loaded:
        caption = self.texts[index]
        problem = caption_problem(caption)
        if problem is not None:
            raise Unusable(problem, f"line {index + 1}: {printable(caption)!r}")
        return Loaded(None, caption, {"image_path": None, "caption": caption, "size": None, "mtime": None})


def _looks_like_shards(spec: str) -> bool:
    return any(mark in spec for mark in (".tar", "{", "::"))


def open_source(spec: str | os.PathLike, *, texts: bool = False, image_column: str | None = None,
                caption_column: str | None = None, image_root: str | os.PathLike | None = None) -> Source:
    """The source ``spec`` names: a folder, a CSV/TSV table, shards, or (``texts``) a text file or table column."""
    spec = os.fspath(spec)
    shown = shorten(spec)
    is_table = Path(spec).suffix.lower() in TABLE_SUFFIXES
    if texts:
        if image_column is not None or image_root is not None:
            raise ClipforgeError("--image-column and --image-root name images, but --texts embeds texts only; "
                                 "drop them, or embed the table as SOURCE to get images and captions together")
        if is_table:
            return TableSource(spec, caption_column=caption_column, images=False)
        if caption_column is not None:
            raise ClipforgeError(f"--caption-column names a table column, but '{shown}' is a text file (one text "
                                 "per line); drop --caption-column, or pass a .csv/.tsv file")
        return TextFileSource(spec)
    if is_table:
        return TableSource(spec, image_column=image_column, caption_column=caption_column, image_root=image_root)
    if image_column is not None or image_root is not None:
        raise ClipforgeError(f"--image-column and --image-root apply to a CSV/TSV table, but '{shown}' is not one "
                             "(.csv, .tsv or .tab)")
    if os.path.isdir(spec):
        if caption_column is not None:
            raise ClipforgeError(f"--caption-column needs a table or shards, but '{shown}' is an image folder; "
                                 "pass a CSV/TSV with image paths and captions")
        return ImageFolderSource(spec)
    if _looks_like_shards(spec):
        from clipforge.collection.shard_source import WebDatasetSource

        return WebDatasetSource(spec, caption_key=caption_column)
    if os.path.exists(spec):
        raise ClipforgeError(f"'{shown}' is not an image folder, a CSV/TSV table (.csv, .tsv, .tab) nor .tar shards; "
                             "pass one of those (a text file goes with --texts)")
    raise ClipforgeError(f"source '{shown}' does not exist; pass an image folder, a CSV/TSV table or .tar shards")
