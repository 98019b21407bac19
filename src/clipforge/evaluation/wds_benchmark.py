"""CLIP_benchmark's WebDataset copies (the ``clip-benchmark/wds_*`` repositories) read from a local folder.

Layout, as ``clip_benchmark.datasets.builder.build_wds_dataset`` reads it: ``classnames.txt``,
``zeroshot_classification_templates.txt`` and an optional ``dataset_type.txt`` ("retrieval" or "multilabel";
absent means classification) at the root; per split a folder with ``nshards.txt`` and ``0.tar``, ``1.tar``, ...
Each sample is a key (``s0000000``) with an image (``.webp``, ``.png``, ``.jpg`` or ``.jpeg``, first found in that
order, as CLIP_benchmark's ``to_tuple``) and a label: ``.cls`` (an integer), ``.npy`` (a multilabel vector) or
``.txt`` (captions, one per line). Only the stdlib ``tarfile`` and PIL are needed; images are decoded on access
from their byte range in the shard, so the datasets stay picklable for DataLoader workers.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.errors import ClipforgeError
from clipforge.evaluation.datasets import ClassificationDataset, stratified_indices
from clipforge.evaluation.retrieval_data import (RetrievalDataset, _seeded_subset, file_fingerprint, read_text,
                                                 resolved, short)

__all__ = ["DATASET_TYPES", "WdsInfo", "is_wds_name", "load_wds", "read_wds_info", "resolve_wds_root"]

DATASET_TYPES = ("classification", "multilabel", "retrieval")
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's preference order
LABEL_EXTENSIONS = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split: key ends at the first dot
HUB_PREFIX = "hf-hub:"


def is_wds_name(name: str) -> bool:
    """A dataset name written ``wds/NAME`` (CLIP_benchmark's spelling) selects this reader."""
    return name.lower().startswith("wds/") and len(name) > 4


def resolve_wds_root(root: str | os.PathLike, split: str | None = None) -> Path:
    """A local folder, or ``hf-hub:ORG/REPO`` downloaded (only the metadata and ``split``) into the HF cache."""
    text = os.fspath(root)
    if not text.startswith(HUB_PREFIX):
        return resolved(text, "dataset folder")
    repo_id = text[len(HUB_PREFIX):].strip("/")
    if repo_id.count("/") != 1:
        raise ClipforgeError(f"'{short(text)}' is not hf-hub:ORG/REPO; write e.g. hf-hub:clip-benchmark/wds_cifar10")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.txt", f"{split}/*"] if split else None
    try:
        folder = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise ClipforgeError(f"cannot download dataset repository '{repo_id}' from the Hugging Face Hub: it needs "
                             "network access, or pass the path of a local clone instead") from None
    except (HfHubHTTPError, ValueError, OSError) as error:
        raise ClipforgeError(f"cannot fetch dataset repository '{repo_id}' ({type(error).__name__}); check its name "
                             "and the network, or pass the path of a local clone") from None
    return Path(folder)


@dataclass
class WdsInfo:
    """The root's metadata: the task its samples serve, and the class names and templates (empty if absent)."""

    root: Path
    dataset_type: str
    classnames: list[str]
    templates: list[str]


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in read_text(path, what).splitlines() if line.strip()]


def read_wds_info(root: Path) -> WdsInfo:
    """Read ``dataset_type.txt``, ``classnames.txt`` and ``zeroshot_classification_templates.txt``."""
    if not root.is_dir():
        raise ClipforgeError(f"dataset folder '{short(root)}' does not exist; pass the folder of a CLIP_benchmark "
                             "WebDataset copy (it holds classnames.txt and test/nshards.txt)")
    type_file = root / "dataset_type.txt"
    dataset_type = read_text(type_file, "dataset type file").strip().lower() if type_file.is_file() \
        else "classification"
    if dataset_type not in DATASET_TYPES:
        raise ClipforgeError(f"'{short(type_file)}' says '{short(dataset_type, 40)}'; it must be retrieval or "
                             "multilabel (or be absent for classification)")
    return WdsInfo(root, dataset_type, _lines(root / "classnames.txt", "classnames file"),
                   _lines(root / "zeroshot_classification_templates.txt", "templates file"))


def shard_paths(root: Path, split: str) -> list[Path]:
    """``<split>/0.tar`` .. ``<split>/{n-1}.tar`` with n from ``<split>/nshards.txt``."""
    count_file = root / split / "nshards.txt"
    if not count_file.is_file():
        present = sorted(p.name for p in root.iterdir() if (p / "nshards.txt").is_file())
        raise ClipforgeError(f"'{short(root)}' has no split '{short(split, 40)}' ({split}/nshards.txt is missing); "
                             f"choose one of {', '.join(present) or 'none (the folder is not a WebDataset copy)'}")
    text = read_text(count_file, "shard count file").strip()
    if not text.isdigit() or int(text) < 1:
        raise ClipforgeError(f"'{short(count_file)}' holds {short(text, 40)!r}; it must be the number of shards, "
                             "a positive whole number")
    shards = [root / split / f"{i}.tar" for i in range(int(text))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ClipforgeError(f"'{short(root / split)}' lacks shard(s) {', '.join(missing[:5])} that nshards.txt "
                             "promises; download the missing shards again")
    return shards


@dataclass
class _Sample:
    key: str
    shard: int
    image: tuple[int, int, str] | None  # (offset, size, extension) of the image member
    label: bytes | None


def _scan_shard(path: Path, number: int, label_ext: str) -> list[_Sample]:
    """One shard's samples, sorted by key; images are located, labels read."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if member.isfile() and match:
                    members.setdefault(match.group(1), {})[match.group(2).lower()] = member
            labels = {key: tar.extractfile(parts[label_ext]).read()  # type: ignore[union-attr]
                      for key, parts in members.items() if label_ext in parts}
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ClipforgeError(f"cannot read shard '{short(path)}' ({type(error).__name__}: {short(error, 80)}); it "
                             "is truncated or not an uncompressed tar, so download it again") from None
    samples = []
    for key in sorted(members):
        parts = members[key]
        ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
        image = (parts[ext].offset_data, parts[ext].size, ext) if ext else None
        samples.append(_Sample(key, number, image, labels.get(key)))
    return samples


class _TarImages:
    """Images decoded on access from their byte range in a shard; picklable, so DataLoader workers can use it."""

    def __init__(self, shards: list[str], refs: list[tuple[int, int, int, str]], keys: list[str]) -> None:
        self.shards, self.refs, self.keys = shards, refs, keys

    def name(self, i: int) -> str:
        return f"{self.shards[self.refs[i][0]]}:{self.keys[i]}.{self.refs[i][3]}"

    def __call__(self, i: int) -> Image.Image:
        shard, offset, size, _ = self.refs[i]
        try:
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                image = Image.open(io.BytesIO(f.read(size)))
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ClipforgeError(f"cannot decode image {short(self.name(i))} ({type(error).__name__}: "
                                 f"{short(error, 80)}); the shard is corrupt, so download it again") from None


class WdsRetrievalDataset(RetrievalDataset):
    """A retrieval split whose images live inside tar shards rather than as files."""

    def __init__(self, name: str, images: _TarImages, captions: list[list[str]], identity: str) -> None:
        super().__init__(name, [images.name(i) for i in range(len(captions))], captions, identity)
        self._images = images

    def __getitem__(self, i: int) -> tuple[Image.Image, list[str]]:
        return self._images(i), list(self.captions[i])

    def path_of(self, i: int) -> str | None:
        return None  # not a file: the skip record's error names the shard and key


def _decode_label(sample: _Sample, dataset_type: str, shards: list[Path]):
    where = f"sample {sample.key} of shard '{short(shards[sample.shard])}'"
    try:
        if dataset_type == "classification":
            return int(sample.label.decode("ascii").strip())  # type: ignore[union-attr]
        if dataset_type == "multilabel":
            vector = np.lib.format.read_array(io.BytesIO(sample.label), allow_pickle=False)  # type: ignore[arg-type]
            if vector.ndim != 1:
                raise ValueError(f"shape {vector.shape}, not a vector")
            return vector
        return sample.label.decode("utf-8").splitlines()  # type: ignore[union-attr]
    except (ValueError, UnicodeDecodeError) as error:
        kind = LABEL_EXTENSIONS[dataset_type]
        raise ClipforgeError(f"the .{kind} label of {where} cannot be read ({short(error, 80)}); the shard is "
                             "corrupt or not of this dataset type, so check dataset_type.txt or download it "
                             "again") from None


def load_wds(name: str, root: str | os.PathLike, split: str = "test", *, max_samples: int | None = None,
             classnames: list[str] | None = None) -> tuple[WdsInfo, ClassificationDataset | RetrievalDataset]:
    """The root's metadata and the split as a dataset of the type ``dataset_type.txt`` names.

    Classification gives a ClassificationDataset with int labels; multilabel one whose labels are numpy
    vectors; retrieval a RetrievalDataset. Samples are ordered by shard, then key. ``classnames`` overrides
    ``classnames.txt``. ``max_samples`` keeps a seeded, order-preserving subset (stratified for classification).
    """
    info = read_wds_info(resolve_wds_root(root, split))
    if classnames is not None:
        info.classnames = list(classnames)
    shards = shard_paths(info.root, split)
    label_ext = LABEL_EXTENSIONS[info.dataset_type]
    samples = [s for number, path in enumerate(shards) for s in _scan_shard(path, number, label_ext)]
    for sample in samples:
        if sample.image is None or sample.label is None:
            lacking = "an image (.webp, .png, .jpg or .jpeg)" if sample.image is None else f"a .{label_ext} label"
            raise ClipforgeError(f"sample {sample.key} of shard '{short(shards[sample.shard])}' has no {lacking}, "
                                 f"as a {info.dataset_type} WebDataset sample must; check dataset_type.txt or "
                                 "download the shard again")
    if not samples:
        raise ClipforgeError(f"the '{split}' shards of '{short(info.root)}' hold no samples; download them again")
    labels = [_decode_label(s, info.dataset_type, shards) for s in samples]
    images = _TarImages([str(p) for p in shards], [(s.shard, *s.image) for s in samples],  # type: ignore[misc]
                        [s.key for s in samples])
    meta = [p for p in (info.root / n for n in ("classnames.txt", "dataset_type.txt")) if p.is_file()]
    identity = (f"wds|{name}|{info.root}|split={split}|type={info.dataset_type}|n={len(samples)}|"
                f"fp={file_fingerprint(shards + meta)}")
    if info.dataset_type == "retrieval":
        keep = _seeded_subset(len(samples), max_samples) if max_samples else list(range(len(samples)))
        subset = _TarImages(images.shards, [images.refs[i] for i in keep], [images.keys[i] for i in keep])
        identity += f"|images={len(keep)}" if len(keep) < len(samples) else ""
        return info, WdsRetrievalDataset(name, subset, [labels[i] for i in keep], identity)
    _check_labels(info, labels)
    dataset = ClassificationDataset(name, info.classnames, labels, identity, images)
    if max_samples is None or max_samples >= len(labels):
        return info, dataset
    if info.dataset_type == "multilabel":
        return info, dataset.subset(_seeded_subset(len(labels), max_samples))
    return info, dataset.subset(stratified_indices(labels, max_samples))


def _check_labels(info: WdsInfo, labels: list) -> None:
    """Labels and class names must belong together, or every metric would be wrong."""
    where = f"'{short(info.root)}'"
    if not info.classnames:
        raise ClipforgeError(f"{where} has no classnames.txt; add one class name per line, or pass classnames=")
    count = len(info.classnames)
    if info.dataset_type == "multilabel":
        bad = next((v.shape[0] for v in labels if v.shape[0] != count), None)
        if bad is not None:
            raise ClipforgeError(f"{where} has multilabel vectors of length {bad} but {count} class names; the "
                                 "class names must match the vector entries one to one")
    elif max(labels) >= count or min(labels) < 0:
        raise ClipforgeError(f"{where} has .cls labels outside 0..{count - 1} (one per class name); classnames.txt "
                             "does not belong to these shards, so check it")
