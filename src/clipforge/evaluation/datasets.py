"""Evaluation datasets read from their native files, so evaluation needs no torchvision and no download step.

Classification formats: CIFAR-10/100 python pickles (or a CIFAR-10 tree of class folders), MNIST-style idx files
(MNIST, Fashion-MNIST), a generic image folder and a CSV/TSV of image paths and labels. Retrieval datasets live in
:mod:`clipforge.evaluation.retrieval_data` and are re-exported here. Every dataset carries an ``identity`` string
that changes when its files change, so feature caches can be keyed on it.
"""

from __future__ import annotations

import builtins
import codecs
import csv
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import zlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from clipforge.errors import ClipforgeError
from clipforge.evaluation import imagenet
from clipforge.evaluation.retrieval_data import (RetrievalDataset, file_fingerprint, load_retrieval, read_text,
                                                 resolved)
from clipforge.transforms import load_image

__all__ = ["CLASSIFICATION_FORMATS", "ClassificationDataset", "RetrievalDataset", "dataset_classnames",
           "dataset_templates", "load_classification", "load_retrieval"]

CLASSIFICATION_FORMATS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "csv") + imagenet.VARIANTS
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "tsv": "csv"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@lru_cache(maxsize=None)
def _builtin() -> dict[str, dict[str, tuple[str, ...]]]:
    text = (resources.files("clipforge.evaluation") / "datasets.json").read_text(encoding="utf-8")
    return {key: {field: tuple(values) for field, values in entry.items()}
            for key, entry in json.loads(text).items() if not key.startswith("_")}


def dataset_classnames(name: str) -> list[str] | None:
    """Built-in human-readable class names of a dataset key (the ones CLIP's prompts use), or None."""
    if (variant := imagenet.canonical(name)) is not None:  # ObjectNet's come from its release's files
        return imagenet.classnames_of(variant) if variant != "objectnet" else None
    entry = _builtin().get(_ALIASES.get(name.lower(), name.lower()))
    return list(entry["classnames"]) if entry else None


def dataset_templates(name: str) -> list[str] | None:
    """Built-in zero-shot prompt templates of a dataset key, with a ``{}`` placeholder, or None."""
    if imagenet.canonical(name) is not None:
        return [template.replace("{c}", "{}") for template in imagenet.metadata()["templates"]]
    entry = _builtin().get(_ALIASES.get(name.lower(), name.lower()))
    return list(entry["templates"]) if entry else None


class _ArrayImages:
    """Decoded uint8 images [N, H, W(, 3)] held in memory; picklable, so DataLoader workers can use it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i]).convert("RGB")


class _FileImages:
    """Image files decoded on access, so a bad file fails with its name when it is used."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __call__(self, i: int) -> Image.Image:
        return load_image(self.paths[i]).convert("RGB")


class ClassificationDataset(torch.utils.data.Dataset):
    """Labelled images; ``labels`` is known up front so stratified subsets and metrics need no decoding."""

    def __init__(self, name: str, classnames: list[str], labels: list[int], identity: str,
                 images: Callable[[int], Image.Image], index: list[int] | None = None) -> None:
        self.name = name
        self.classnames = classnames
        self.labels = labels
        self.identity = identity
        self._images = images
        self._index = index if index is not None else list(range(len(labels)))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self._images(self._index[i]), self.labels[i]

    def path_of(self, i: int) -> str | None:
        """The image file of item ``i`` (None for images held in memory), so a skipped item can be named."""
        paths = getattr(self._images, "paths", None)
        return paths[self._index[i]] if paths is not None else None

    def subset(self, indices: Sequence[int]) -> ClassificationDataset:
        """The items at ``indices`` (in that order), with an identity that names exactly which ones."""
        indices = [int(i) for i in indices]
        digest = hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest()[:16]
        return ClassificationDataset(self.name, self.classnames, [self.labels[i] for i in indices],
                                     f"{self.identity}|subset={len(indices)}:{digest}", self._images,
                                     [self._index[i] for i in indices])


def stratified_indices(labels: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """``k`` indices with each class's share of ``labels`` kept (largest remainder), seeded, in original order."""
    n = len(labels)
    if k >= n:
        return list(range(n))
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    exact = [k * len(by_class[c]) / n for c in classes]
    quota = [int(x) for x in exact]
    for j in sorted(range(len(classes)), key=lambda j: quota[j] - exact[j])[:k - sum(quota)]:
        quota[j] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c, q in zip(classes, quota):
        chosen += [by_class[c][i] for i in rng.permutation(len(by_class[c]))[:q]]
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------- CIFAR pickles

_RECONSTRUCT = np.array(0).__reduce__()[0]  # numpy's array reconstructor, whichever module it lives in now
_ALLOWED_GLOBALS = {
    **{("builtins", name): getattr(builtins, name) for name in ("dict", "list", "bytes", "str", "int")},
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1 name, used by the original CIFAR files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2 name
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build the containers and numpy arrays CIFAR files hold, never call arbitrary code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR file never does")
        return _ALLOWED_GLOBALS[(module, name)]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise ClipforgeError(f"cannot unpickle '{path}' ({e}); the file is truncated, corrupt or not a CIFAR "
                             "python-format file, so download and extract it again") from None
    if not isinstance(data, dict):
        raise ClipforgeError(f"'{path}' does not hold a dict as CIFAR python-format files do; check the file")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _names(meta: dict, field: str, path: Path) -> list[str]:
    names = meta.get(field)
    if not isinstance(names, list):
        raise ClipforgeError(f"'{path}' has no '{field}' list; check it is the dataset's original meta file")
    return [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in names]


def _cifar_pickles(key: str, folder: Path, split: str) -> tuple[np.ndarray, list[int], list[str], list[Path]]:
    if key == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name, label_field, names_field = "batches.meta", "labels", "label_names"
    else:
        files, meta_name, label_field, names_field = [split], "meta", "fine_labels", "fine_label_names"
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ClipforgeError(f"'{folder}' lacks {', '.join(missing)}; extract the full {key} python-format archive")
    arrays, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        data, batch_labels = batch.get("data"), batch.get(label_field)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
                and isinstance(batch_labels, list) and len(batch_labels) == len(data)):
            raise ClipforgeError(f"'{folder / name}' is not a CIFAR batch (expected uint8 'data' [N, 3072] and "
                                 f"N '{label_field}'); the file is corrupt, so extract the archive again")
        arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(x) for x in batch_labels)
    meta = folder / meta_name
    if meta.is_file():
        classnames = _names(_unpickle(meta), names_field, meta)
    else:
        classnames = dataset_classnames(key) or []
    read = [folder / name for name in files] + ([meta] if meta.is_file() else [])
    return np.ascontiguousarray(np.concatenate(arrays)), labels, classnames, read


# ---------------------------------------------------------------------------------------------- idx files

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ClipforgeError(f"cannot decompress '{path}' ({e}); the file is truncated or corrupt, so download "
                             "it again") from None
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise ClipforgeError(f"'{path}' is not an idx file of {ndim}-d uint8 data (bad header); check you passed "
                             "the right file, or download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ClipforgeError(f"'{path}' holds {len(body)} data bytes but its header says {'x'.join(map(str, dims))};"
                             " the file is truncated or corrupt, so download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _idx_dataset(key: str, root: Path, split: str) -> tuple[np.ndarray, list[int], list[str], list[Path]]:
    prefix = "train" if split == "train" else "t10k"
    folders = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    found = []
    for kind in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        names = [kind + ".gz", kind]
        hits = [folder / name for folder in folders for name in names if (folder / name).is_file()]
        if not hits:
            raise ClipforgeError(f"'{root}' has no {names[0]} or {names[1]}; put the {key} idx files there")
        found.append(hits[0])
    images, labels = _read_idx(found[0], 3), _read_idx(found[1], 1)
    if len(images) != len(labels):
        raise ClipforgeError(f"'{found[0]}' has {len(images)} images but '{found[1]}' has {len(labels)} labels; "
                             "the files do not belong together, so download them again")
    return images, labels.tolist(), dataset_classnames(key) or [], found


# ---------------------------------------------------------------------------------------------- files on disk

def _display_names(folders: list[str], classnames_file: str | None) -> list[str]:
    if classnames_file is None:
        return [name.replace("_", " ") for name in folders]
    path = Path(classnames_file).expanduser()
    if not path.is_file():
        raise ClipforgeError(f"classnames file '{path}' does not exist; pass a text file with one class per line")
    names = [line.strip() for line in read_text(path, "classnames file").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ClipforgeError(f"classnames file '{path}' has {len(names)} names but the dataset has {len(folders)} "
                             "classes; give one name per class, in sorted class order")
    return names


def _image_files(folder: Path) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _class_folders(root: Path, folders: list[str]) -> tuple[list[str], list[int]]:
    paths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = _image_files(root / folder)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _cifar10_folders(root: Path, split: str) -> tuple[list[str], list[int], list[str], list[Path]]:
    meta = root / "batches.meta"
    classnames = _names(_unpickle(meta), "label_names", meta) if meta.is_file() else dataset_classnames("cifar10")
    folders = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    if sorted(classnames) != folders:
        raise ClipforgeError(f"'{root / split}' has class folders {', '.join(folders) or 'none'}; expected exactly "
                             f"{', '.join(classnames)}")
    paths, labels = _class_folders(root / split, classnames)
    return paths, labels, classnames, [meta] if meta.is_file() else []


def _csv_dataset(file: Path, split: str, image_column: str, label_column: str,
                 classnames_file: str | None) -> tuple[list[str], list[int], list[str]]:
    delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(read_text(file, "CSV file"), newline=""), delimiter=delimiter)
    missing = [c for c in (image_column, label_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise ClipforgeError(f"'{file}' has no column(s) {', '.join(missing)} (found "
                             f"{', '.join(reader.fieldnames or []) or 'none'}); pass image_column=/label_column=")
    rows = list(reader)
    if any(row[image_column] is None or row[label_column] is None for row in rows):
        raise ClipforgeError(f"'{file}' has rows with fewer fields than its header; fix those rows")
    raw = [row[label_column].strip() for row in rows]
    if all(value.lstrip("-").isdigit() for value in raw):
        ints = [int(value) for value in raw]
        classes = [str(i) for i in range(max(ints, default=-1) + 1)]
        if min(ints, default=0) < 0:
            raise ClipforgeError(f"'{file}' has negative labels; integer labels must run from 0")
    else:
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        ints = [index[value] for value in raw]
    keep = [i for i, row in enumerate(rows) if "split" not in row or row["split"] == split]
    paths = [str(file.parent / rows[i][image_column]) for i in keep]
    return paths, [ints[i] for i in keep], _display_names(classes, classnames_file)


# ---------------------------------------------------------------------------------------------- entry point

def load_classification(name: str, root: str | os.PathLike, split: str = "test", *,
                        classnames_file: str | None = None, image_column: str = "filepath",
                        label_column: str = "label", max_samples: int | None = None) -> ClassificationDataset:
    """Load a classification split from native files; ``max_samples`` keeps a seeded stratified subset.

    ``root`` is the dataset folder (for CIFAR also its parent), or the CSV/TSV file for ``csv``. A CSV with a
    ``split`` column is filtered on it; without one every row is used.
    """
    key = imagenet.canonical(name) or _ALIASES.get(name.lower(), name.lower())
    if key not in CLASSIFICATION_FORMATS:
        raise ClipforgeError(f"unknown classification dataset '{name}'; choose one of "
                             f"{', '.join(CLASSIFICATION_FORMATS)}")
    if split not in ("train", "test"):
        raise ClipforgeError(f"unknown split '{split}' for '{name}'; choose 'train' or 'test'")
    if max_samples is not None and max_samples < 1:
        raise ClipforgeError(f"max_samples must be at least 1, got {max_samples}; pass None to use every sample")
    path = resolved(root, "dataset path")
    if not path.exists():
        raise ClipforgeError(f"dataset path '{path}' does not exist; pass the folder (or file) that holds {key}")
    images: Callable[[int], Image.Image]
    if key in ("cifar10", "cifar100"):
        subfolder = "cifar-10-batches-py" if key == "cifar10" else "cifar-100-python"
        probe = split if key == "cifar100" else "data_batch_1" if split == "train" else "test_batch"
        folder = next((f for f in (path, path / subfolder) if (f / probe).is_file()), None)
        if folder is not None:
            array, labels, classnames, read = _cifar_pickles(key, folder, split)
            images = _ArrayImages(array)
        elif key == "cifar10" and (path / split).is_dir():
            paths, labels, classnames, read = _cifar10_folders(path, split)
            images, read = _FileImages(paths), read + [Path(p) for p in paths]
        else:
            looked = f"{subfolder}/{probe}" + (f" or {split}/<class>/ image folders" if key == "cifar10" else "")
            raise ClipforgeError(f"no {key} data under '{path}' (looked for {looked}); pass the extracted dataset folder")
    elif key in ("mnist", "fashion-mnist"):
        array, labels, classnames, read = _idx_dataset(key, path, split)
        images = _ArrayImages(array)
    elif key in imagenet.VARIANTS:  # the split is the variant's evaluation set (ImageNet: validation)
        paths, labels, classnames = imagenet.load_variant(key, path, _class_folders)
        classnames = _display_names(tuple(classnames), classnames_file) if classnames_file else classnames
        images, read = _FileImages(paths), [Path(p) for p in paths]
    elif key == "imagefolder":
        base = path / split if (path / split).is_dir() else path
        if not base.is_dir():
            raise ClipforgeError(f"'{base}' is not a folder; for 'imagefolder' pass a folder of class folders")
        classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ClipforgeError(f"'{base}' has no class folders; lay images out as <root>/<class>/<image>")
        paths, labels = _class_folders(base, classes)
        classnames = _display_names(classes, classnames_file)
        images, read = _FileImages(paths), [Path(p) for p in paths]
    else:
        if not path.is_file():
            raise ClipforgeError(f"'{path}' is not a file; for 'csv' pass the CSV/TSV file itself")
        paths, labels, classnames = _csv_dataset(path, split, image_column, label_column, classnames_file)
        images, read = _FileImages(paths), [path]
    if not labels:
        raise ClipforgeError(f"the '{split}' split of {key} at '{path}' is empty; check the split name and the files")
    if max(labels) >= len(classnames) or min(labels) < 0:
        raise ClipforgeError(f"{key} at '{path}' has labels outside 0..{len(classnames) - 1} (one per class name); "
                             "the label and class-name files do not match, so check them")
    identity = f"{key}|{path}|split={split}|n={len(labels)}|fp={file_fingerprint(read)}"
    dataset = ClassificationDataset(key, classnames, labels, identity, images)
    if max_samples is None or max_samples >= len(labels):
        return dataset
    return dataset.subset(stratified_indices(labels, max_samples))
