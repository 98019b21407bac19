"""``OnnxCLIP``: embed images and texts from a ``clipforge export --to onnx`` folder with onnxruntime, no torch.

Preprocessing is ``clipforge.transforms.core`` (the code the torch transform runs, so the pixels are
identical) minus the mean/std step, which the image graph does; tokenizing is clipforge's numpy
tokenizer with the settings the manifest records. Texts are cut after the last [EOS] before they
reach the graph (its length is dynamic), which is exact for causal towers and much cheaper than
running all 77 positions. Everything returned is float32 numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from clipforge.errors import ClipforgeError, InputError, shorten
from clipforge.runtime.manifest import TOKENIZER_DIR, read_manifest
from clipforge.transforms.core import eval_geometry, to_pil, unit_array

__all__ = ["OnnxCLIP", "OnnxConfig", "OnnxPreprocess", "require_onnxruntime", "set_default_threads"]

IMAGE_BATCH = 64
TEXT_BATCH = 256
_DEFAULT_THREADS: list[int | None] = [None]  # set by the commands' --threads


def set_default_threads(threads: int | None) -> None:
    """onnxruntime intra-op threads for exports loaded without ``threads`` (None: one per core)."""
    _DEFAULT_THREADS[0] = threads


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ClipforgeError("running an ONNX export needs the onnxruntime package; install it with "
                             "`pip install 'clipforge[onnxruntime]'`") from None
    return onnxruntime


@dataclass(frozen=True)
class OnnxConfig:
    """The parts of a ``ModelConfig`` the collection code reads: name, embed_dim, and which towers exist."""

    name: str
    embed_dim: int
    vision: dict[str, Any] | None
    text: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.embed_dim, "vision": self.vision, "text": self.text}


class OnnxPreprocess:
    """PIL image / path / uint8 array -> CHW float32 in [0, 1]: the eval transform without mean/std.

    Picklable (a plain class), so it can run in worker processes like the torch transform.
    """

    def __init__(self, image_size: int, interpolation: str = "bicubic", resize_mode: str = "shortest",
                 fill_color: int = 0) -> None:
        self.image_size, self.interpolation = int(image_size), interpolation
        self.resize_mode, self.fill_color = resize_mode, int(fill_color)

    def __call__(self, image: Any) -> np.ndarray:
        img = eval_geometry(to_pil(image), self.image_size, self.interpolation, self.resize_mode, self.fill_color)
        return unit_array(img)

    def __repr__(self) -> str:
        return (f"OnnxPreprocess(image_size={self.image_size}, resize_mode={self.resize_mode!r}, "
                f"interpolation={self.interpolation!r}, fill_color={self.fill_color}) -> [0, 1]")


def _session(folder: Path, name: str, threads: int | None) -> Any:
    ort = require_onnxruntime()
    file = folder / name
    if not file.is_file():
        raise ClipforgeError(f"'{shorten(folder)}' lacks {name}, which its manifest lists; export the model again")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 (onnxruntime raises its own classes for bad files)
        detail = " ".join(str(error).split())[:80]
        raise ClipforgeError(f"'{shorten(file)}' is not a graph onnxruntime can load ({detail}); export the model "
                             "again") from None


class OnnxCLIP:
    """A CLIP model from an ONNX export folder: ``encode_image``, ``encode_text`` and their inputs' preparation."""

    backend = "onnx"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.manifest = manifest = read_manifest(self.folder)
        config = manifest.get("config") or {}
        self.config = OnnxConfig(str(manifest.get("model_name") or manifest["model"]), int(manifest["embed_dim"]),
                                 config.get("vision") if manifest.get("image") else None,
                                 config.get("text") if manifest.get("text") else None)
        self.logit_scale = float(manifest.get("logit_scale", 100.0))
        threads = _DEFAULT_THREADS[0] if threads is None else threads
        self.threads = threads
        pre = manifest.get("preprocess")
        self.preprocess: OnnxPreprocess | None = None
        self._image = self._text = None
        if manifest.get("image"):
            self.preprocess = OnnxPreprocess(pre["image_size"], pre["interpolation"], pre["resize_mode"],
                                             pre["fill_color"])
            self._image = _session(self.folder, manifest["image"]["file"], threads)
        self._tokenizer: Callable[[list[str]], np.ndarray] | None = None
        if manifest.get("text"):
            self._tokenizer = self._build_tokenizer(manifest["tokenizer"])
            self._text = _session(self.folder, manifest["text"]["file"], threads)

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int | None = None) -> OnnxCLIP:
        """The export in ``folder``; ``threads``: onnxruntime's intra-op threads (default: one per core)."""
        return cls(folder, threads)

    @property
    def image_size(self) -> int:
        if self.preprocess is None:
            raise InputError(f"the export in '{shorten(self.folder)}' has no image graph; encode images with a "
                             "model that has an image tower")
        return self.preprocess.image_size

    def _build_tokenizer(self, info: dict[str, Any]) -> Callable[[list[str]], np.ndarray]:
        from clipforge.tokenizer.factory import CLIPTokenizer, HFTokenizer

        kwargs = dict(info.get("kwargs") or {})
        if info.get("hf_tokenizer_name"):
            folder = self.folder / (info.get("folder") or TOKENIZER_DIR)
            return HFTokenizer(folder if folder.is_dir() else info["hf_tokenizer_name"], info["context_length"],
                               **kwargs).numpy
        return CLIPTokenizer(info["context_length"], **kwargs).numpy

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """int64 token ids [N, context_length], as the torch model's ``tokenize`` gives them."""
        if self._tokenizer is None:
            raise InputError(f"the export in '{shorten(self.folder)}' has no text graph; encode texts with a model "
                             "that has a text tower")
        return np.ascontiguousarray(self._tokenizer(texts), dtype=np.int64)

    def _trim(self, ids: np.ndarray) -> np.ndarray:
        """Drop the columns after the last pooled token, where the manifest says that is exact."""
        info = self.manifest["tokenizer"]
        if not info.get("trim_to_pooled") or ids.shape[0] == 0:
            return ids
        if info.get("pool_type") == "eos":
            positions = (ids == int(info.get("eos_id", 2))).argmax(axis=1)
        else:
            positions = ids.argmax(axis=1)
        return np.ascontiguousarray(ids[:, : int(positions.max()) + 1])

    def encode_tokens(self, ids: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Embeddings [N, D] of token ids [N, L]."""
        if self._text is None:
            raise InputError(f"the export in '{shorten(self.folder)}' has no text graph; encode texts with a model "
                             "that has a text tower")
        ids = np.asarray(ids, dtype=np.int64)
        context = int(self.manifest["tokenizer"]["context_length"])
        if ids.ndim != 2 or ids.shape[1] > context:
            raise InputError(f"token ids must be [N, L] with L <= {context}, got shape {list(ids.shape)}; tokenize "
                             "with model.tokenize(...)")
        if ids.shape[0] == 0:
            return np.zeros((0, self.config.embed_dim), np.float32)
        output = "text_embeds" if normalize else "text_features"
        return self._text.run([output], {"input_ids": self._trim(ids)})[0]

    def encode_text(self, texts: str | Sequence[str], normalize: bool = True,
                    batch_size: int = TEXT_BATCH) -> np.ndarray:
        """L2-normalised float32 [N, D] embeddings of texts (``normalize=False``: the raw features)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        parts = [self.encode_tokens(self.tokenize(texts[i:i + batch_size]), normalize)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.config.embed_dim), np.float32)

    def encode_image_pixels(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Embeddings [N, D] of preprocessed pixels [N, 3, S, S], float32 in [0, 1] (mean/std not applied)."""
        size = self.image_size
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise InputError(f"model '{self.config.name}' takes pixels of shape [N, 3, {size}, {size}], got "
                             f"{list(pixels.shape)}; prepare images with model.preprocess")
        if pixels.shape[0] == 0:
            return np.zeros((0, self.config.embed_dim), np.float32)
        output = "image_embeds" if normalize else "image_features"
        return self._image.run([output], {"pixels": pixels})[0]

    def encode_image(self, images: Any, normalize: bool = True, batch_size: int = IMAGE_BATCH) -> np.ndarray:
        """Embeddings [N, D] of images: paths, PIL images or uint8 arrays (one, or a list)."""
        size = self.image_size
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        parts = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            pixels = np.stack([self.preprocess(image) for image in batch]) if batch else np.zeros((0, 3, size, size))
            parts.append(self.encode_image_pixels(pixels, normalize))
        return np.concatenate(parts) if parts else np.zeros((0, self.config.embed_dim), np.float32)

    def weights_digest(self) -> str:
        """Identifies the exported weights (for a collection's settings): the manifest's digest of the model."""
        digest = self.manifest.get("weights_digest")
        if digest is None:  # an export without one: hash the manifest itself
            digest = hashlib.blake2b(json.dumps(self.manifest, sort_keys=True).encode(), digest_size=16).hexdigest()
        return f"onnx:{digest}"

    def __repr__(self) -> str:
        return f"OnnxCLIP('{self.folder}', model={self.config.name!r}, embed_dim={self.config.embed_dim})"
