"""Evaluation datasets from native files: tiny files written here, plus the real copies in ../shared/data."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.errors import ClipforgeError, ImageError
from clipforge.evaluation.datasets import (CLASSIFICATION_FORMATS, ClassificationDataset, RetrievalDataset,
                                           dataset_classnames, dataset_templates, load_classification,
                                           load_retrieval, stratified_indices)
from conftest import SHARED_DATA

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rng_images(count: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] -> CIFAR's [N, 3072] rows of R, G, B planes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_cifar10(folder: Path, per_batch: int = 2, test: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    written = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = test if name == "test_batch" else per_batch
        images, labels = rng_images(n, (32, 32, 3), seed), [(seed + i) % 10 for i in range(n)]
        dump(folder / name, {b"batch_label": b"x", b"data": cifar_rows(images), b"labels": labels})
        written[name] = images, labels
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return written


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    data = struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_pickles_round_trip(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = write_cifar10(folder)
    test = load_classification("cifar10", tmp_path)
    images, labels = written["test_batch"]
    assert test.name == "cifar10" and test.classnames == CIFAR10_NAMES and test.labels == labels
    for i in range(len(test)):
        image, label = test[i]
        assert label == labels[i] and np.array_equal(as_array(image), images[i])
    train = load_classification("cifar10", tmp_path, "train")
    expected = [written[f"data_batch_{i}"] for i in range(1, 6)]
    assert train.labels == [label for _, labels in expected for label in labels]
    assert np.array_equal(as_array(train[9][0]), expected[4][0][1])


def test_cifar100_uses_fine_labels_and_readable_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    images = rng_images(4, (32, 32, 3))
    dump(folder / "test", {b"data": cifar_rows(images), b"fine_labels": [2, 0, 1, 2], b"coarse_labels": [9, 9, 9, 9]})
    dump(folder / "meta", {b"fine_label_names": [b"apple", b"aquarium_fish", b"maple_tree"],
                           b"coarse_label_names": [b"x"]})
    data = load_classification("cifar100", tmp_path)
    assert data.classnames == ["apple", "aquarium fish", "maple tree"] and data.labels == [2, 0, 1, 2]
    assert np.array_equal(as_array(data[3][0]), images[3])


def test_cifar10_image_folders_use_meta_order(tmp_path):
    images = rng_images(11, (32, 32, 3))
    for i, name in enumerate(CIFAR10_NAMES):
        write_png(tmp_path / "test" / name / "0000.png", images[i])
    write_png(tmp_path / "test" / "ship" / "0001.png", images[10])
    reversed_names = CIFAR10_NAMES[::-1]
    dump(tmp_path / "batches.meta", {b"label_names": [n.encode() for n in reversed_names]})
    data = load_classification("cifar10", tmp_path)
    assert data.classnames == reversed_names
    assert data.labels == [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # truck first; ship (index 1) has two images
    assert np.array_equal(as_array(data[0][0]), images[9]) and np.array_equal(as_array(data[2][0]), images[10])
    (tmp_path / "batches.meta").unlink()
    assert load_classification("cifar10", tmp_path).classnames == CIFAR10_NAMES
    (tmp_path / "test" / "boat").mkdir()
    with pytest.raises(ClipforgeError, match="expected exactly airplane"):
        load_classification("cifar10", tmp_path)


def test_cifar_errors(tmp_path):
    with pytest.raises(ClipforgeError, match=r"looked for cifar-10-batches-py/test_batch or test/<class>/"):
        load_classification("cifar10", tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(ClipforgeError, match="lacks data_batch_3"):
        load_classification("cifar10", tmp_path, "train")
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:500])
    with pytest.raises(ClipforgeError, match="truncated, corrupt"):
        load_classification("cifar10", tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ClipforgeError, match="is not a CIFAR batch"):
        load_classification("cifar10", tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ClipforgeError, match=r"labels outside 0\.\.9"):
        load_classification("cifar10", tmp_path)


def test_cifar_pickles_written_by_numpy1_load(tmp_path):
    written = write_cifar10(tmp_path)
    batch = tmp_path / "test_batch"
    raw = batch.read_bytes()
    assert b"numpy._core.multiarray" in raw  # numpy 2 wrote it; the original files name numpy.core.multiarray
    batch.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert np.array_equal(as_array(load_classification("cifar10", tmp_path)[2][0]), written["test_batch"][0][2])


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_rejects_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(tmp_path / "test_batch", {b"data": _Exploit(marker), b"labels": [0]})
    with pytest.raises(ClipforgeError, match=r"references (posix|nt|os)\.system"):
        load_classification("cifar10", tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- idx

@pytest.mark.parametrize("name,compress", [("mnist", True), ("fashion_mnist", False), ("fashion-mnist", True)])
def test_idx_round_trip(tmp_path, name, compress):
    suffix = ".gz" if compress else ""
    images, labels = rng_images(5, (28, 28)), np.array([3, 1, 4, 1, 5], np.uint8)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    data = load_classification(name, tmp_path)
    assert data.labels == labels.tolist() and data.classnames == dataset_classnames(name)
    for i in range(5):
        pixels = as_array(data[i][0])
        assert pixels.shape == (28, 28, 3) and all(np.array_equal(pixels[..., c], images[i]) for c in range(3))


def test_idx_errors(tmp_path):
    with pytest.raises(ClipforgeError, match="has no t10k-images-idx3-ubyte.gz or t10k-images-idx3-ubyte"):
        load_classification("mnist", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng_images(3, (28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ClipforgeError, match="has 3 images but .* has 4 labels"):
        load_classification("mnist", tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + b"\0\0"))
    with pytest.raises(ClipforgeError, match="holds 2 data bytes but its header says 3; the file is truncated"):
        load_classification("mnist", tmp_path)
    labels.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 3, 3) + b"\0\0\0"))
    with pytest.raises(ClipforgeError, match="bad header"):
        load_classification("mnist", tmp_path)
    labels.write_bytes(gzip.compress(b"\0" * 100)[:20])
    with pytest.raises(ClipforgeError, match="cannot decompress"):
        load_classification("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------- files

def test_imagefolder_layouts_and_classnames_file(tmp_path):
    images = rng_images(4, (8, 8, 3))
    write_png(tmp_path / "train" / "red_fox" / "b.png", images[0])
    write_png(tmp_path / "train" / "red_fox" / "a.png", images[1])
    write_png(tmp_path / "train" / "cat" / "sub" / "c.png", images[2])
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    data = load_classification("imagefolder", tmp_path, "train")
    assert data.classnames == ["cat", "red fox"] and data.labels == [0, 1, 1]
    assert np.array_equal(as_array(data[1][0]), images[1])  # files sorted within a class
    write_png(tmp_path / "flat" / "dog" / "x.png", images[3])
    assert load_classification("imagefolder", tmp_path / "flat").classnames == ["dog"]
    names = tmp_path / "names.txt"
    names.write_text("house cat\nvulpes vulpes\n")
    assert load_classification("imagefolder", tmp_path, "train", classnames_file=str(names)).classnames == [
        "house cat", "vulpes vulpes"]
    names.write_text("just one\n")
    with pytest.raises(ClipforgeError, match="has 1 names but the dataset has 2 classes"):
        load_classification("imagefolder", tmp_path, "train", classnames_file=str(names))
    with pytest.raises(ClipforgeError, match="has no class folders"):
        load_classification("imagefolder", tmp_path / "flat" / "dog")


def test_imagefolder_unreadable_image_fails_at_access(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_classification("imagefolder", tmp_path)
    with pytest.raises(ImageError, match="broken.jpg"):
        data[0]


def test_csv_labels_splits_and_tsv(tmp_path):
    images = rng_images(3, (8, 8, 3))
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", images[i])
    table = tmp_path / "data.csv"
    table.write_text("filepath,label,split\nimg/0.png,zebra,test\nimg/1.png,ant,train\nimg/2.png,zebra,train\n")
    test = load_classification("csv", table)
    assert test.classnames == ["ant", "zebra"] and test.labels == [1]  # classes come from every split
    assert np.array_equal(as_array(test[0][0]), images[0])
    assert load_classification("csv", table, "train").labels == [0, 1]
    tsv = tmp_path / "data.tsv"
    tsv.write_text("path\tcls\nimg/2.png\t2\nimg/0.png\t0\n")
    data = load_classification("tsv", tsv, image_column="path", label_column="cls")
    assert data.labels == [2, 0] and data.classnames == ["0", "1", "2"]
    with pytest.raises(ClipforgeError, match=r"has no column\(s\) filepath, label \(found path, cls\)"):
        load_classification("csv", tsv)
    table.write_text("filepath,label,split\nimg/0.png,zebra,train\n")
    with pytest.raises(ClipforgeError, match="'test' split of csv .* is empty"):
        load_classification("csv", table)


# ---------------------------------------------------------------------------------------------- shared behaviour

def test_stratified_subset_is_seeded_and_order_preserving(tmp_path):
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10, np.uint8)
    np.random.default_rng(3).shuffle(labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng_images(100, (28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    full = load_classification("mnist", tmp_path)
    small = load_classification("mnist", tmp_path, max_samples=20)
    assert Counter(small.labels) == {0: 12, 1: 6, 2: 2}
    indices = stratified_indices(full.labels, 20)
    assert indices == sorted(indices) and small.labels == [full.labels[i] for i in indices]
    assert np.array_equal(as_array(small[5][0]), as_array(full[indices[5]][0]))
    assert small.identity == load_classification("mnist", tmp_path, max_samples=20).identity != full.identity
    balanced = [0] * 5 + [1] * 5 + [2] * 5
    assert Counter(balanced[i] for i in stratified_indices(balanced, 4)) == {0: 2, 1: 1, 2: 1}
    assert load_classification("mnist", tmp_path, max_samples=1000).identity == full.identity


def test_subset_identity_and_pickling(tmp_path):
    write_cifar10(tmp_path)
    data = load_classification("cifar10", tmp_path)
    assert isinstance(data, ClassificationDataset) and data.identity.startswith(f"cifar10|{tmp_path.resolve()}|")
    part = data.subset([2, 0])
    assert part.labels == [data.labels[2], data.labels[0]] and part.classnames == data.classnames
    assert np.array_equal(as_array(part[0][0]), as_array(data[2][0]))
    assert part.identity.startswith(data.identity + "|subset=") and part.identity != data.subset([0, 2]).identity
    assert pickle.loads(pickle.dumps(part)).labels == part.labels  # DataLoader workers may need this
    before = data.identity
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes() + b".")  # trailing byte: size changes
    assert load_classification("cifar10", tmp_path).identity != before


def test_loader_argument_errors(tmp_path):
    with pytest.raises(ClipforgeError, match="unknown classification dataset 'svhn'; choose one of cifar10"):
        load_classification("svhn", tmp_path)
    with pytest.raises(ClipforgeError, match="does not exist"):
        load_classification("mnist", tmp_path / "nowhere")
    with pytest.raises(ClipforgeError, match="choose 'train' or 'test'"):
        load_classification("mnist", tmp_path, "val")
    assert "imagefolder" in CLASSIFICATION_FORMATS and "csv" in CLASSIFICATION_FORMATS


def test_builtin_metadata():
    assert dataset_classnames("cifar10") == CIFAR10_NAMES
    cifar100 = dataset_classnames("cifar100")
    assert len(cifar100) == 100 and "aquarium fish" in cifar100 and not any("_" in n for n in cifar100)
    assert dataset_classnames("mnist") == [str(i) for i in range(10)]
    assert dataset_templates("mnist") == ['a photo of the number: "{}".']
    assert dataset_classnames("fashion_mnist")[-1] == "ankle boot"
    for key in ("cifar10", "cifar100", "mnist", "fashion-mnist"):
        assert all("{}" in t and "{c}" not in t for t in dataset_templates(key))
    assert dataset_templates("cifar10")[0] == "a photo of a {}." and len(dataset_templates("cifar10")) == 18
    assert dataset_classnames("imagefolder") is None and dataset_templates("nope") is None


# ---------------------------------------------------------------------------------------------- retrieval

def test_karpathy_json(tmp_path):
    pixels = rng_images(1, (8, 8, 3))[0]
    for name in "abc":
        write_png(tmp_path / "val2014" / f"{name}.png", pixels)
    images = [{"filepath": "val2014", "filename": "a.png", "split": "train", "sentences": [{"raw": "x"}]},
              {"filepath": "val2014", "filename": "b.png", "split": "test",
               "sentences": [{"raw": "two"}, {"raw": "one"}]},
              {"filepath": "val2014", "filename": "c.png", "split": "restval", "sentences": [{"raw": "r"}]}]
    file = tmp_path / "dataset_coco.json"
    file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    data = load_retrieval("coco", file)
    assert isinstance(data, RetrievalDataset) and data.name == "coco" and len(data) == 1
    assert data.image_paths == [str(tmp_path.resolve() / "val2014" / "b.png")] and data.captions == [["two", "one"]]
    image, captions = data[0]
    assert np.array_equal(as_array(image), pixels) and captions == ["two", "one"]
    assert load_retrieval("coco", file, "restval", image_root=str(tmp_path)).captions == [["r"]]
    file.write_text(json.dumps({"images": [{"filename": "a.png"}]}))
    with pytest.raises(ClipforgeError, match="is not a Karpathy-split JSON"):
        load_retrieval("coco", file)


def write_flickr(tmp_path: Path) -> Path:
    rows = [("a.jpg", 'a "quoted" dog .', "test"), ("b.jpg", "b one", "train"), ("a.jpg", "a two", "test"),
            ("c.jpg", "c one", "extra"), ("d.jpg", "d one", "val"), ("e.jpg", "e one", "test")]
    file = tmp_path / "captions.tsv"
    file.write_text("image\tcaption\tsplit\n" + "".join("\t".join(row) + "\n" for row in rows))
    (tmp_path / "images").mkdir()
    for name in "abcde":
        write_png(tmp_path / "images" / f"{name}.jpg", rng_images(1, (4, 4, 3))[0])
    text = tmp_path / "text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("".join(f"{image}#{k}\t{caption}\n" for k, (image, caption, _) in
                                                     enumerate(rows)) + "b.jpg.1#0\tstray line\n")
    (text / "Flickr_8k.testImages.txt").write_text("e.jpg\na.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("d.jpg\n")
    (text / "Flickr_8k.trainImages.txt").write_text("b.jpg\n")
    return file


def test_captions_table_groups_in_first_appearance_order(tmp_path):
    file = write_flickr(tmp_path)
    data = load_retrieval("flickr8k", file)
    assert [Path(p).name for p in data.image_paths] == ["a.jpg", "e.jpg"]
    assert data.captions == [['a "quoted" dog .', "a two"], ["e one"]]
    assert Path(data.image_paths[0]).parent == (tmp_path / "images").resolve()
    assert data[1][0].mode == "RGB" and load_retrieval("flickr8k", file, "val").captions == [["d one"]]
    table = tmp_path / "pairs.csv"
    table.write_text('image,caption\nx.jpg,"one, two"\ny.jpg,three\nx.jpg,four\n')
    write_png(tmp_path / "images" / "x.jpg", rng_images(1, (4, 4, 3))[0])
    assert load_retrieval("csv", table).captions == [["one, two", "four"], ["three"]]  # no split column: all rows


def test_token_file_matches_table(tmp_path):
    file = write_flickr(tmp_path)
    token = tmp_path / "text" / "Flickr8k.token.txt"
    for split in ("test", "val", "train"):
        from_token = load_retrieval("flickr8k", token, split, image_root=str(tmp_path / "images"))
        from_table = load_retrieval("flickr8k", file, split)
        assert (from_token.image_paths, from_token.captions) == (from_table.image_paths, from_table.captions)
    (tmp_path / "text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(ClipforgeError, match=r"no split list for 'val' .*looked for \*trainImages.txt"):
        load_retrieval("flickr8k", token, "dev")


def test_retrieval_max_images_and_identity(tmp_path):
    file = tmp_path / "captions.tsv"
    file.write_text("image\tcaption\n" + "".join(f"{i}.png\tcap {i} {k}\n" for i in range(20) for k in range(2)))
    for i in range(20):
        write_png(tmp_path / f"{i}.png", rng_images(1, (4, 4, 3))[0])
    full = load_retrieval("tsv", file)
    small = load_retrieval("tsv", file, max_images=5)
    names = [Path(p).name for p in small.image_paths]
    assert len(small) == 5 and names == sorted(names, key=lambda n: int(n.split(".")[0]))
    assert all(c == [f"cap {n[:-4]} 0", f"cap {n[:-4]} 1"] for n, c in zip(names, small.captions))
    assert small.identity == load_retrieval("tsv", file, max_images=5).identity != full.identity


def test_retrieval_errors(tmp_path):
    with pytest.raises(ClipforgeError, match="unknown retrieval dataset 'msrvtt'; choose one of flickr8k"):
        load_retrieval("msrvtt", tmp_path / "x.json")
    with pytest.raises(ClipforgeError, match="does not exist"):
        load_retrieval("flickr8k", tmp_path / "x.json")
    other = tmp_path / "captions.txt"
    other.write_text("hello\n")
    with pytest.raises(ClipforgeError, match="cannot tell the format"):
        load_retrieval("flickr8k", other)
    file = write_flickr(tmp_path)
    with pytest.raises(ClipforgeError, match="no captions for split 'restval'"):
        load_retrieval("flickr8k", file, "restval")
    with pytest.raises(ClipforgeError, match="pass image_root="):
        load_retrieval("flickr8k", file, image_root=str(tmp_path))
    bad = tmp_path / "bad.tsv"
    bad.write_text("img\ttext\n")
    with pytest.raises(ClipforgeError, match=r"no column\(s\) image, caption \(found img, text\)"):
        load_retrieval("tsv", bad)


# ---------------------------------------------------------------------------------------------- real data

def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found; the shared data folder is absent on this machine")
    return path


def test_real_cifar10_test_folders():
    data = load_classification("cifar10", shared("cifar10"))
    assert len(data) == 10_000 and data.classnames == CIFAR10_NAMES
    assert Counter(data.labels) == {label: 1000 for label in range(10)}
    image, label = data[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0


@pytest.mark.parametrize("split,per_class", [("test", 1000), ("train", 6000)])
def test_real_fashion_mnist(split, per_class):
    data = load_classification("fashion-mnist", shared("fashion-mnist"), split)
    assert len(data) == 10 * per_class and Counter(data.labels) == {label: per_class for label in range(10)}
    assert data[0][0].size == (28, 28)


def test_real_flickr8k_test_split_from_tsv_and_token_file():
    table = load_retrieval("flickr8k", shared("flickr8k", "captions.tsv"))
    assert len(table) == 1000 and sum(map(len, table.captions)) == 5000
    token = load_retrieval("flickr8k", shared("flickr8k", "original_text", "Flickr8k.token.txt"),
                           image_root=str(shared("flickr8k", "images")))
    assert token.image_paths == table.image_paths and token.captions == table.captions
    assert table[0][0].mode == "RGB"
