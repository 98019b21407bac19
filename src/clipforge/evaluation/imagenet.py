"""ImageNet-1k and its distribution shifts as the paper's robustness study reads them, from their usual folders.

Class ``i`` is the ``i``-th synset in sorted order (``n01440764`` first), named by OpenAI's curated class
names, with OpenAI's 80 templates (``imagenet.json``, written by ``scripts/import_imagenet_metadata.py``).

- ``imagenet``: the validation set as synset folders (``ROOT/val/n01440764/*.JPEG`` or ``ROOT/n01440764/``),
  or the flat folder of 50,000 ``ILSVRC2012_val_*.JPEG`` with Kaggle's ``LOC_val_solution.csv`` beside it.
- ``imagenet-v2``: ImageNetV2's release layout, folders ``0`` .. ``999`` named by class index.
- ``imagenet-sketch``: synset folders (``ROOT/sketch/<synset>/`` or ``ROOT/<synset>/``), all 1,000 classes.
- ``imagenet-a`` / ``imagenet-r``: 200 synset folders each. Protocol: a zero-shot head over the 200 class
  names, labels in sorted-synset order — CLIP_benchmark's protocol. The other common one (wise-ft's)
  builds the 1,000-class head and keeps only these 200 columns; a zero-shot head's columns are
  independent of each other, so the two give the same predictions (``subset_columns`` maps the 200 to
  their ImageNet indices; tests check the equality).
- ``objectnet``: ObjectNet 1.0 as released (``ROOT/objectnet-1.0/images/<folder>/``, the ``mappings/`` JSON
  files in ``ROOT`` or ``ROOT/objectnet-1.0/mappings``). Protocol: CLIP_benchmark's — a zero-shot head over
  the 113 ObjectNet classes that map to ImageNet classes, named by ObjectNet's labels (lower-cased), in
  sorted folder order, no border crop. wise-ft's protocol (the 1,000-class head, each ObjectNet class
  scored by the max over its ImageNet classes, a 2-pixel border cropped) gives different numbers; the two
  are not comparable.

Every variant uses OpenAI's 80 ImageNet templates, as CLIP_benchmark does.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from clipforge.errors import ClipforgeError

VARIANTS = ("imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r", "objectnet")
_ALIASES = {"imagenet1k": "imagenet", "imagenet-1k": "imagenet", "imagenetv2": "imagenet-v2",
            "imagenet_sketch": "imagenet-sketch", "imagenet-sketch": "imagenet-sketch", "imagenet_a": "imagenet-a",
            "imagenet_r": "imagenet-r", "imagenet_v2": "imagenet-v2"}


@lru_cache(maxsize=None)
def metadata() -> dict:
    """synsets, classnames, templates, imagenet_a_synsets, imagenet_r_synsets (see the module docstring)."""
    return json.loads(resources.files("clipforge.evaluation").joinpath("imagenet.json").read_text("utf-8"))


def canonical(name: str) -> str | None:
    """The variant ``name`` means ("ImageNet_A" -> "imagenet-a"), or None when it is no ImageNet variant."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    return key if key in VARIANTS else None


def synsets_of(variant: str) -> list[str]:
    """The synsets a variant's head covers, in label order (sorted)."""
    meta = metadata()
    if variant == "imagenet-a":
        return list(meta["imagenet_a_synsets"])
    if variant == "imagenet-r":
        return list(meta["imagenet_r_synsets"])
    return list(meta["synsets"])


def subset_columns(variant: str) -> list[int]:
    """For each of the variant's classes, its index among ImageNet's 1,000 (the restricted-head protocol)."""
    index = {synset: i for i, synset in enumerate(metadata()["synsets"])}
    return [index[synset] for synset in synsets_of(variant)]


def classnames_of(variant: str) -> list[str]:
    names = metadata()["classnames"]
    return [names[i] for i in subset_columns(variant)]


def _folder_with(root: Path, names: list[str], *inner: str) -> Path | None:
    """root or root/<inner> that holds at least one of the class folders ``names``."""
    for folder in [root / part for part in inner] + [root]:
        if folder.is_dir() and any((folder / name).is_dir() for name in names[:1000]):
            return folder
    return None


def load_variant(variant: str, root: Path, class_folders) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classnames) of a variant under ``root``.

    ``class_folders(base, folders)`` lists the images of ``base/folder`` for each folder, labelled by the
    folder's position (``datasets._class_folders``; a folder that is not there has no images).
    """
    if variant == "objectnet":
        return _objectnet(root, class_folders)
    return (*image_paths(variant, root, class_folders), classnames_of(variant))


def _objectnet(root: Path, class_folders) -> tuple[list[str], list[int], list[str]]:
    mappings = next((f for f in (root, root / "mappings", root / "objectnet-1.0" / "mappings")
                     if (f / "folder_to_objectnet_label.json").is_file()), None)
    images = next((f for f in (root / "objectnet-1.0" / "images", root / "images") if f.is_dir()), None)
    if mappings is None or images is None or not (mappings / "objectnet_to_imagenet_1k.json").is_file():
        raise ClipforgeError(f"no ObjectNet 1.0 under '{root}' (looked for objectnet-1.0/images/ and "
                             "folder_to_objectnet_label.json + objectnet_to_imagenet_1k.json); pass the folder "
                             "the release was extracted into")
    try:
        folder_to_label = json.loads((mappings / "folder_to_objectnet_label.json").read_text("utf-8"))
        to_imagenet = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise ClipforgeError(f"ObjectNet's mapping files in '{mappings}' cannot be read ({error}); re-extract "
                             "the release") from None
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}
    folders = sorted(label_to_folder[label] for label in to_imagenet if label in label_to_folder)
    return (*class_folders(images, folders), [folder_to_label[folder].lower() for folder in folders])


def image_paths(variant: str, root: Path, class_folders) -> tuple[list[str], list[int]]:
    """(paths, labels) of a variant's images under ``root`` (``class_folders`` as in ``load_variant``)."""
    synsets = synsets_of(variant)
    if variant == "imagenet-v2":
        folders = [str(i) for i in range(1000)]
        base = _folder_with(root, folders, "imagenetv2-matched-frequency-format-val")
        if base is None:
            raise ClipforgeError(f"no ImageNetV2 class folders 0..999 under '{root}'; pass the extracted "
                                 "imagenetv2-matched-frequency-format-val folder")
    else:
        folders = synsets
        inner = {"imagenet": ("val",), "imagenet-sketch": ("sketch",)}.get(variant, (variant,))
        base = _folder_with(root, folders, *inner)
        if base is None and variant == "imagenet":
            return _kaggle_val(root, class_folders)
        if base is None:
            raise ClipforgeError(f"no synset folders (n01440764, ...) for {variant} under '{root}'; pass the "
                                 "extracted dataset folder")
    return class_folders(base, folders)


def _kaggle_val(root: Path, class_folders) -> tuple[list[str], list[int]]:
    """The flat validation folder with Kaggle's LOC_val_solution.csv (ImageId, 'synset x y x y ...')."""
    solution = next((p for p in (root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv")
                     if p.is_file()), None)
    if solution is None:
        raise ClipforgeError(f"'{root}' has neither synset folders (val/n01440764/...) nor a flat validation folder "
                             "with LOC_val_solution.csv; pass one of these layouts")
    index = {synset: i for i, synset in enumerate(metadata()["synsets"])}
    with open(solution, newline="", encoding="utf-8") as handle:
        labels_by_id = {row["ImageId"]: index.get(row["PredictionString"].split()[0], -1)
                        for row in csv.DictReader(handle) if row.get("PredictionString")}
    folder = root / "val" if (root / "val").is_dir() else root
    paths, labels = [], []
    for path in class_folders(folder, ["."])[0]:
        label = labels_by_id.get(Path(path).stem, -1)
        if label >= 0:
            paths.append(path)
            labels.append(label)
    return paths, labels
