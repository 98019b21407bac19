"""CSV/TSV tables of image paths and captions: rows are read once, images are decoded on demand.

The file is decoded with ``errors="surrogateescape"``, so one line of bad UTF-8 never breaks the
file: that row's caption is flagged ``bad_utf8``. Rows whose text is unusable, or whose image file is
not there (one ``stat`` per distinct path, when the table is read), are known before training starts
(``problems``): the sampler leaves them out of the epoch and reports each once per epoch. Only an
image that is there but does not decode is found while loading. Image paths are relative to
``image_root`` (default: the table's folder) unless absolute. ``split`` keeps only rows whose
``split_column`` equals it (e.g. Flickr8k's ``captions.tsv``, split ``train``). A row is named
``/abs/table.csv:LINE`` (its first line in the file) wherever it is reported.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from PIL import Image

from clipforge.data.skips import (
    BAD_UTF8,
    EMPTY_CAPTION,
    MALFORMED_ROW,
    MISSING_FILE,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
)
from clipforge.errors import ClipforgeError, ConfigError, ImageError
from clipforge.transforms import load_image

__all__ = ["BadSample", "CsvSource", "default_separator"]


class BadSample(Exception):
    """One sample cannot be used; ``reason`` (a ``clipforge.data.skips`` name) is what it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_separator(path: str | os.PathLike) -> str:
    return "\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ","


def caption_problem(caption: str | None) -> str | None:
    """Why a caption cannot be trained on, or None if it is fine."""
    if caption is None:
        return MALFORMED_ROW
    try:
        caption.encode("utf-8")  # only the surrogates that stand for undecodable bytes fail
    except UnicodeEncodeError:
        return BAD_UTF8
    if not caption.strip():
        return EMPTY_CAPTION
    return None


def file_problem(path: str) -> str | None:
    """Why an image path cannot be opened, from one ``stat``: gone (or a dangling link), or not a file."""
    if os.path.isfile(path):
        return None
    return UNREADABLE_IMAGE if os.path.exists(path) else MISSING_FILE


def _column(header: list[str], name: str, field: str, path: Path, separator: str) -> int:
    if name in header:
        return header.index(name)
    raise ConfigError(f"data.{field} '{name}' is not a column of {path}; its header has: "
                      f"{', '.join(repr(h) for h in header)} (separator {separator!r}; set data.separator "
                      "if the file uses another)")


class CsvSource:
    """Rows of (image path, caption); ``problems`` holds the rows known to be bad before any image is decoded."""

    def __init__(self, path: str | os.PathLike, image_column: str = "filepath", caption_column: str = "title",
                 separator: str | None = None, keep_rows: bool = False, image_root: str | None = None,
                 split: str | None = None, split_column: str = "split", check_files: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "does not exist"
            raise ClipforgeError(f"data.path '{self.path}' {what}; pass a CSV or TSV file with a header row")
        self.table = os.path.abspath(self.path)  # rows are named by it: the same from any working directory
        self.separator = separator or default_separator(self.path)
        self.images: list[str] = []
        self.captions: list[str] = []
        self.lines: list[int] = []  # the file line each row starts on (the header is line 1)
        self.problems: dict[int, str] = {}  # row -> reason, for rows bad before any image is decoded
        self.rows: list[list[str]] | None = [] if keep_rows else None  # every field, for make_shards' .json
        folder = str(Path(image_root).resolve() if image_root else self.path.resolve().parent)
        if image_root and not Path(folder).is_dir():
            raise ClipforgeError(f"data.image_root '{image_root}' is not a directory; point it at the folder the "
                                 "image column's paths are relative to")
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=self.separator)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise ClipforgeError(f"data.path '{self.path}' is empty; it needs a header row naming the "
                                     "image and caption columns") from None
            except csv.Error as error:
                raise ClipforgeError(f"data.path '{self.path}': cannot parse the header row ({error})") from None
            self.header = header
            image_at = _column(header, image_column, "image_column", self.path, self.separator)
            caption_at = _column(header, caption_column, "caption_column", self.path, self.separator)
            split_at = _column(header, split_column, "split_column", self.path, self.separator) if split else None
            while True:
                line = reader.line_num
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error:  # e.g. a field over csv.field_size_limit(): that row only is bad
                    self._add(line + 1, "", "", MALFORMED_ROW, [])
                    if reader.line_num == line:
                        break
                    continue
                if not row:  # blank line
                    continue
                if split_at is not None and (split_at >= len(row) or row[split_at].strip() != split):
                    continue
                image = row[image_at].strip() if image_at < len(row) else None
                caption = row[caption_at] if caption_at < len(row) else None
                problem = caption_problem(caption) if image is not None else MALFORMED_ROW
                if problem is None and not image:
                    problem = MISSING_IMAGE
                if image:
                    image = os.path.join(folder, image)  # an absolute image path stays as it is
                self._add(line + 1, image or "", caption or "", problem, row)
        if split and not self.images:
            raise ClipforgeError(f"data.split '{split}' matches no row of {self.path} (column '{split_column}')")
        if check_files:
            self._check_files()

    def _add(self, line: int, image: str, caption: str, problem: str | None, row: list[str]) -> None:
        if self.rows is not None:
            self.rows.append(row)
        if problem is not None:
            self.problems[len(self.images)] = problem
        self.images.append(image)
        self.captions.append(caption)
        self.lines.append(line)

    def _check_files(self) -> None:
        """One stat per distinct image path: a missing file is a known problem, not a decode-time surprise."""
        known: dict[str, str | None] = {}
        for index, image in enumerate(self.images):
            if index in self.problems:
                continue
            if image not in known:
                known[image] = file_problem(image)
            if known[image] is not None:
                self.problems[index] = known[image]  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> tuple[str, str]:
        """(source, detail) of row ``index``: ``/abs/table.csv:LINE`` and its image path."""
        return f"{self.table}:{self.lines[index]}", self.images[index]

    def check(self, index: int) -> str:
        """The image path of a row not known to be bad; raises ``BadSample`` otherwise."""
        problem = self.problems.get(index)
        if problem is not None:
            raise BadSample(problem, f"{self.table}:{self.lines[index]}: {problem.replace('_', ' ')}")
        return self.images[index]

    def load(self, index: int) -> tuple[Image.Image, str]:
        path = self.check(index)
        try:
            image = load_image(path)
        except ImageError as error:  # the file may also have gone since the table was read
            reason = file_problem(path) or UNREADABLE_IMAGE
            raise BadSample(reason, f"{self.table}:{self.lines[index]}: {error}") from None
        return image, self.captions[index]
