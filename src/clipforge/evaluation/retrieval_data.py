"""Image-text retrieval datasets (Flickr8k, Flickr30k, COCO) read from their native caption files.

Three file layouts are understood, chosen by the file's name: a Karpathy-split JSON (``*.json``), a table with
columns ``image``, ``caption`` and optional ``split`` (``*.tsv`` / ``*.csv``), and Flickr's ``*.token.txt``
(``<image>#<k><TAB><caption>``) whose split comes from sibling ``*{train,dev,test}Images.txt`` lists. Images keep the
order in which they first appear in the file; each image's captions keep file order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from clipforge.errors import ClipforgeError
from clipforge.errors import shorten as short  # re-exported: the eval modules and commands quote inputs with it
from clipforge.transforms import load_image

__all__ = ["RETRIEVAL_FORMATS", "RetrievalDataset", "load_retrieval", "file_fingerprint", "read_text", "resolved", "short"]

RETRIEVAL_FORMATS = ("flickr8k", "flickr30k", "coco", "csv", "tsv")
_SPLITS = {"train": "train", "val": "val", "dev": "val", "test": "test", "restval": "restval"}
_LIST_SPLITS = {"train": "train", "dev": "val", "test": "test"}  # Flickr_8k.<key>Images.txt -> split


def file_fingerprint(paths: Iterable[os.PathLike | str]) -> str:
    """Short hash of the names, sizes and mtimes of ``paths``: changes when the data on disk changes, costs a stat."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{os.fspath(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError as error:  # a dangling link or link loop: skipped when read, but still part of the data
            digest.update(f"{os.fspath(path)}:errno={error.errno}\n".encode())
    return digest.hexdigest()[:16]


def _seeded_subset(n: int, k: int, seed: int = 0) -> list[int]:
    """``k`` of ``range(n)`` drawn with a fixed seed and returned in their original order (reproducible fast evals)."""
    if k >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


class RetrievalDataset(torch.utils.data.Dataset):
    """Images with all their captions; ``identity`` keys feature caches to the caption file's content and split."""

    def __init__(self, name: str, image_paths: list[str], captions: list[list[str]], identity: str) -> None:
        self.name = name
        self.image_paths = image_paths
        self.captions = captions
        self.identity = identity

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, list[str]]:
        return load_image(self.image_paths[i]).convert("RGB"), list(self.captions[i])

    def path_of(self, i: int) -> str:
        """The image file of item ``i``, so a skipped item can be named."""
        return self.image_paths[i]


def resolved(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute with links followed; a link loop is a ClipforgeError, not pathlib's RuntimeError."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        raise ClipforgeError(f"{what} '{short(os.fspath(path))}' is a symbolic link that points back at itself; "
                             "pass the real file or folder") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file (a BOM is dropped), or a ClipforgeError naming it and the fix.

    ``what`` says which input it is ("labels file"), so the sentence names the option the user set.
    """
    name = short(os.fspath(path))
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClipforgeError(f"cannot read {what} '{name}': it is not UTF-8 text ({e.reason} at byte {e.start}); "
                             "re-save it as UTF-8") from None
    except FileNotFoundError:
        raise ClipforgeError(f"{what} '{name}' does not exist; check the path") from None
    except IsADirectoryError:
        raise ClipforgeError(f"{what} '{name}' is a folder; pass a text file") from None
    except OSError as e:
        raise ClipforgeError(f"cannot read {what} '{name}': {e.strerror or e}; check the file and its "
                             "permissions") from None


def _karpathy(path: Path, split: str) -> tuple[list[tuple[str, str]], list[Path]]:
    try:
        images = json.loads(read_text(path))["images"]
        rows = [(os.path.join(item.get("filepath", ""), item["filename"]), sentence["raw"])
                for item in images if item["split"] == split for sentence in item["sentences"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ClipforgeError(
            f"'{path}' is not a Karpathy-split JSON ({type(e).__name__}: {e}); expected "
            '{"images": [{"filename", "split", "sentences": [{"raw"}]}]}') from None
    return rows, [path]


def _table(path: Path, split: str) -> tuple[list[tuple[str, str]], list[Path]]:
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    columns = reader.fieldnames or []
    missing = [c for c in ("image", "caption") if c not in columns]
    if missing:
        raise ClipforgeError(f"'{path}' has no column(s) {', '.join(missing)} (found {', '.join(columns) or 'none'});"
                             " give it a header line with columns image, caption and optionally split")
    rows = []
    for row in reader:
        if None in row.values():
            raise ClipforgeError(f"line {reader.line_num} of '{path}' has fewer fields than the header; fix that row")
        if "split" not in row or _SPLITS.get(row["split"], row["split"]) == split:
            rows.append((row["image"], row["caption"]))
    return rows, [path]


def _token_file(path: Path, split: str) -> tuple[list[tuple[str, str]], list[Path]]:
    lists = {_LIST_SPLITS[key]: p for key in _LIST_SPLITS for p in sorted(path.parent.glob(f"*{key}Images.txt"))}
    if split not in lists:
        raise ClipforgeError(
            f"no split list for '{split}' next to '{path}' (looked for *trainImages.txt, *devImages.txt, "
            f"*testImages.txt in {path.parent}); put the Flickr_8k.*Images.txt files there or use a Karpathy JSON")
    wanted = set(read_text(lists[split]).split())
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab or "#" not in key:
            raise ClipforgeError(f"line {number} of '{path}' is not '<image>#<k><TAB><caption>'; check the file")
        image = key.rsplit("#", 1)[0]
        if image in wanted:
            rows.append((image, caption))
    return rows, [path, lists[split]]


def load_retrieval(name: str, path: str | os.PathLike, split: str = "test", *, image_root: str | None = None,
                   max_images: int | None = None) -> RetrievalDataset:
    """Load a retrieval split from a Karpathy JSON, a caption table or a Flickr ``*.token.txt``.

    ``image_root`` defaults to the file's folder for a JSON, and to ``<folder>/images`` (if it exists, else the
    folder) for the other layouts. A table without a ``split`` column is used whole. ``max_images`` keeps a
    seeded, order-preserving sample of images with all their captions.
    """
    key = name.lower()
    if key not in RETRIEVAL_FORMATS:
        raise ClipforgeError(f"unknown retrieval dataset '{name}'; choose one of {', '.join(RETRIEVAL_FORMATS)}")
    if split not in _SPLITS:
        raise ClipforgeError(f"unknown split '{split}' for '{name}'; choose one of train, val, test, restval")
    split = _SPLITS[split]
    file = resolved(path, "caption file")
    if not file.is_file():
        raise ClipforgeError(f"caption file '{file}' does not exist; pass the Karpathy JSON, captions TSV/CSV or "
                             "*.token.txt of the dataset")
    lower = file.name.lower()
    if lower.endswith(".json") and key not in ("csv", "tsv"):
        rows, read = _karpathy(file, split)
    elif lower.endswith((".tsv", ".csv")):
        rows, read = _table(file, split)
    elif ".token" in lower and key not in ("csv", "tsv"):
        rows, read = _token_file(file, split)
    else:
        raise ClipforgeError(f"cannot tell the format of '{file}'; name it *.json (Karpathy split), *.tsv/*.csv "
                             "(columns image, caption, split) or *.token.txt (Flickr)")
    if not rows:
        raise ClipforgeError(f"'{file}' has no captions for split '{split}'; check the split name or the file")
    grouped: dict[str, list[str]] = {}
    for image, caption in rows:
        grouped.setdefault(image, []).append(caption)
    if image_root is not None:
        root = resolved(image_root, "image_root")
    elif lower.endswith(".json") or not (file.parent / "images").is_dir():
        root = file.parent
    else:
        root = file.parent / "images"
    images = list(grouped)
    if max_images is not None:
        if max_images < 1:
            raise ClipforgeError(f"max_images must be at least 1, got {max_images}; pass None to use every image")
        images = [images[i] for i in _seeded_subset(len(images), max_images)]
    paths = [str(root / image) for image in images]
    # A wrong image_root leaves every image missing; one missing (or dangling) file is only skipped later.
    if not os.path.lexists(paths[0]) and not any(os.path.lexists(p) for p in paths):
        raise ClipforgeError(f"image '{paths[0]}' named in '{file}' does not exist; pass image_root= pointing at the "
                             "folder that holds the images")
    identity = (f"retrieval:{key}|{file}|split={split}|root={root}|images={len(paths)}|"
                f"captions={sum(len(grouped[i]) for i in images)}|fp={file_fingerprint(read)}")
    return RetrievalDataset(key, paths, [grouped[i] for i in images], identity)

