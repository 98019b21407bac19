"""``clipforge_onnx.json``: what an ONNX export holds and everything needed to run it without torch.

The export writes it; the runtime reads it. It records the model's identity, the image preprocessing
(size, resize mode, interpolation, fill, mean and std: the graph applies mean/std itself, the numpy
preprocessing does the rest) and the tokenizer (context length, cleaning, Hugging Face tokenizer),
so an export directory is a complete deployment unit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clipforge.errors import ClipforgeError, shorten

__all__ = ["DEFAULT_OPSET", "FORMAT_VERSION", "IMAGE_FILE", "MANIFEST_NAME", "TEXT_FILE", "TOKENIZER_DIR",
           "is_onnx_export", "read_manifest"]

MANIFEST_NAME = "clipforge_onnx.json"
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer's files, for models that use one
FORMAT_VERSION = 1
DEFAULT_OPSET = 17  # LayerNormalization is one op from 17 on; onnxruntime >= 1.14 runs it


def is_onnx_export(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder written by ``clipforge export --to onnx`` (it holds the manifest)."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return False
    try:
        return (Path(path).expanduser() / MANIFEST_NAME).is_file()
    except (OSError, ValueError):
        return False


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed manifest of an export folder, or one sentence on what is wrong with the folder."""
    root = Path(folder).expanduser()
    shown = shorten(folder)
    if not root.is_dir():
        raise ClipforgeError(f"ONNX export folder '{shown}' does not exist; pass a folder written by "
                             "`clipforge export SOURCE DIR --to onnx`")
    file = root / MANIFEST_NAME
    if not file.is_file():
        raise ClipforgeError(f"'{shown}' has no {MANIFEST_NAME}, so it is not a clipforge ONNX export; export the "
                             "model again with `clipforge export SOURCE DIR --to onnx`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClipforgeError(f"{MANIFEST_NAME} in '{shown}' cannot be read ({type(error).__name__}); export the "
                             "model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "clipforge-onnx":
        raise ClipforgeError(f"{MANIFEST_NAME} in '{shown}' is not a clipforge ONNX manifest; export the model again")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ClipforgeError(f"the export in '{shown}' has format version {version!r}, newer than this clipforge "
                             f"reads ({FORMAT_VERSION}); upgrade clipforge or export again with this version")
    for key in ("embed_dim", "model"):
        if key not in manifest:
            raise ClipforgeError(f"{MANIFEST_NAME} in '{shown}' lacks '{key}'; export the model again")
    return manifest
