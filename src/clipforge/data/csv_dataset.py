"""CSV/TSV tables of image paths and captions: rows are read once, images are decoded on demand.

The file is decoded with ``errors="surrogateescape"``, so one line of bad UTF-8 never breaks the
file: that row's caption is flagged ``bad_utf8`` and the sampler skips (and counts) it when it
reaches it. Image paths are relative to ``image_root`` (default: the table's folder) unless absolute.
``split`` keeps only rows whose ``split_column`` equals it (e.g. Flickr8k's ``captions.tsv``, split ``train``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from PIL import Image

from clipforge.errors import ClipforgeError, ConfigError, ImageError
from clipforge.transforms import load_image

__all__ = ["BadSample", "CsvSource", "default_separator"]


class BadSample(Exception):
    """One sample cannot be used; ``reason`` is the key it is counted under in ``Batch.skipped``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_separator(path: str | os.PathLike) -> str:
    return "\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ","


def caption_problem(caption: str | None) -> str | None:
    """Why a caption cannot be trained on, or None if it is fine."""
    if caption is None:
        return "malformed_row"
    try:
        caption.encode("utf-8")  # only the surrogates that stand for undecodable bytes fail
    except UnicodeEncodeError:
        return "bad_utf8"
    if not caption.strip():
        return "empty_caption"
    return None


def _column(header: list[str], name: str, field: str, path: Path, separator: str) -> int:
    if name in header:
        return header.index(name)
    raise ConfigError(f"data.{field} '{name}' is not a column of {path}; its header has: "
                      f"{', '.join(repr(h) for h in header)} (separator {separator!r}; set data.separator "
                      "if the file uses another)")


class CsvSource:
    """Rows of (image path, caption) with per-row problems known from the text alone."""

    def __init__(self, path: str | os.PathLike, image_column: str = "filepath", caption_column: str = "title",
                 separator: str | None = None, keep_rows: bool = False, image_root: str | None = None,
                 split: str | None = None, split_column: str = "split") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "does not exist"
            raise ClipforgeError(f"data.path '{self.path}' {what}; pass a CSV or TSV file with a header row")
        self.separator = separator or default_separator(self.path)
        self.images: list[str] = []
        self.captions: list[str] = []
        self.problems: dict[int, str] = {}  # row -> reason, for rows bad before any image is opened
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
                    self._add("", "", "malformed_row", [])
                    if reader.line_num == line:
                        break
                    continue
                if not row:  # blank line
                    continue
                if split_at is not None and (split_at >= len(row) or row[split_at].strip() != split):
                    continue
                image = row[image_at].strip() if image_at < len(row) else None
                caption = row[caption_at] if caption_at < len(row) else None
                problem = caption_problem(caption) if image is not None else "malformed_row"
                if problem is None and not image:
                    problem = "missing_image"
                if image:
                    image = os.path.join(folder, image)  # an absolute image path stays as it is
                self._add(image or "", caption or "", problem, row)
        if split and not self.images:
            raise ClipforgeError(f"data.split '{split}' matches no row of {self.path} (column '{split_column}')")

    def _add(self, image: str, caption: str, problem: str | None, row: list[str]) -> None:
        if self.rows is not None:
            self.rows.append(row)
        if problem is not None:
            self.problems[len(self.images)] = problem
        self.images.append(image)
        self.captions.append(caption)

    def __len__(self) -> int:
        return len(self.images)

    def check(self, index: int) -> str:
        """The image path of a row whose text is usable; raises ``BadSample`` otherwise."""
        problem = self.problems.get(index)
        if problem is not None:
            raise BadSample(problem, f"row {index} of {self.path}: {problem.replace('_', ' ')}")
        return self.images[index]

    def load(self, index: int) -> tuple[Image.Image, str]:
        path = self.check(index)
        try:
            image = load_image(path)
        except ImageError as error:
            reason = "unreadable_image" if os.path.lexists(path) else "missing_image"
            raise BadSample(reason, f"row {index}: {error}") from None
        return image, self.captions[index]
