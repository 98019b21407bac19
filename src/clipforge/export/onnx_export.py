"""Export any model ``clipforge.load`` reads to two ONNX graphs plus a manifest, checked against PyTorch.

The folder holds ``image.onnx`` (pixels in [0, 1] -> L2-normalised embeddings, mean/std inside),
``text.onnx`` (token ids, dynamic batch and length -> L2-normalised embeddings, the model's own
pooling), ``clipforge_onnx.json`` (``runtime.manifest``) and, for a model with a Hugging Face
tokenizer, its files under ``tokenizer/``. It is written into a temporary folder beside the target
and renamed into place only after both graphs agree with the PyTorch model in onnxruntime, so a
failed export leaves nothing half-written. The TorchScript exporter is used: it handles these towers
with dynamic axes in about a second, with no extra dependency (the dynamo exporter needs onnxscript).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.errors import ClipforgeError, shorten
from clipforge.export.graphs import ImageGraph, TextGraph
from clipforge.runtime.manifest import (
    DEFAULT_OPSET,
    FORMAT_VERSION,
    IMAGE_FILE,
    MANIFEST_NAME,
    TEXT_FILE,
    TOKENIZER_DIR,
)

__all__ = ["DEFAULT_OPSET", "TOLERANCE", "export_onnx"]

MIN_OPSET = 14  # scaled_dot_product_attention exports from 14 on
TOLERANCE = 1e-4  # most any embedding component may differ from PyTorch's (float32)
SAMPLE_TEXTS = ["a photo of a dog", "two children play soccer in a park at sunset", "A&B café — 12 cats!"]
IMAGE_NAMES = {"inputs": ["pixels"], "outputs": ["image_embeds", "image_features"]}
TEXT_NAMES = {"inputs": ["input_ids"], "outputs": ["text_embeds", "text_features"]}


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or one sentence naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ClipforgeError(f"exporting to ONNX needs the {error.name or 'onnx'} package; install it with "
                             "`pip install 'clipforge[onnx]'`") from None
    return onnx, onnxruntime


def _prepare_target(source: str, out_dir: Path, overwrite: bool) -> None:
    shown = shorten(out_dir)
    local = Path(source).expanduser()
    if local.exists() and (out_dir.resolve() == local.resolve() or out_dir.resolve() in local.resolve().parents):
        raise ClipforgeError(f"export folder '{shown}' is the source '{shorten(source)}' or holds it, and would be "
                             "replaced; export into another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ClipforgeError(f"export target '{shown}' is a file; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ClipforgeError(f"export folder '{shown}' is not empty; pass --overwrite to replace it or choose a "
                             "new folder")
    parent = out_dir.parent
    if not parent.is_dir():
        raise ClipforgeError(f"the folder '{shorten(parent)}' that would hold '{out_dir.name}' does not exist; "
                             "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipforgeError(f"cannot write into '{shorten(parent)}' (permission denied); choose a folder you "
                             "can write to")


def _export(module: torch.nn.Module, example: torch.Tensor, file: Path, names: dict[str, list[str]],
            axes: dict[str, dict[int, str]], opset: int) -> None:
    module.eval()  # a new wrapper is in training mode, which the exporter would restore onto the model's BatchNorms
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, (example,), str(file), dynamo=False, opset_version=opset,
                          input_names=names["inputs"], output_names=names["outputs"], dynamic_axes=axes,
                          do_constant_folding=True)


def _sample_pixels(size: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 3, size, size), dtype=np.float32)


def _sample_ids(tokenizer: Any, batch: int) -> np.ndarray:
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] + " " * (i // len(SAMPLE_TEXTS)) for i in range(batch)]
    return np.ascontiguousarray(tokenizer.numpy(texts), dtype=np.int64)


def _check(session: Any, reference: Any, inputs: np.ndarray, name: str, what: str) -> float:
    """Max abs difference of the normalised embeddings of ``inputs`` between onnxruntime and PyTorch."""
    got = session.run([name], {session.get_inputs()[0].name: inputs})[0]
    with torch.no_grad():
        expected = reference(torch.from_numpy(inputs)).float().numpy()
    if got.shape != expected.shape:
        raise ClipforgeError(f"the exported {what} graph gives shape {got.shape} where PyTorch gives "
                             f"{expected.shape}; please report this model")
    return float(np.abs(got - expected).max()) if got.size else 0.0


def _validate(folder: Path, model: Any, tokenizer: Any, image_size: int | None, transform: Any) -> dict[str, float]:
    """Run both graphs in onnxruntime at two batch sizes (and two text lengths) and compare with PyTorch."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    diffs: dict[str, float] = {}
    if image_size is not None:
        session = ort.InferenceSession(str(folder / IMAGE_FILE), options, providers=["CPUExecutionProvider"])
        mean = torch.tensor(transform.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(transform.std, dtype=torch.float32).view(1, 3, 1, 1)

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            return model.encode_image((pixels - mean) / std, normalize=True)

        diffs["image"] = max(_check(session, encode_image, _sample_pixels(image_size, batch, batch), "image_embeds",
                                    "image") for batch in (1, 3))
    if tokenizer is not None:
        session = ort.InferenceSession(str(folder / TEXT_FILE), options, providers=["CPUExecutionProvider"])

        def encode_text(ids: torch.Tensor) -> torch.Tensor:
            return model.encode_text(ids, normalize=True)

        full = _sample_ids(tokenizer, 3)
        short = full[:2, : max(2, int((full != 0).sum(1).max()))]  # a shorter length from the same graph
        diffs["text"] = max(_check(session, encode_text, ids, "text_embeds", "text") for ids in (full, short))
    for what, diff in diffs.items():
        if not diff <= TOLERANCE:
            raise ClipforgeError(f"the exported {what} graph differs from the PyTorch model by {diff:.3g} (more than "
                                 f"{TOLERANCE:g}) under onnxruntime; try another --opset or report this model")
    return diffs


def _manifest(source: str, model: Any, transform: Any, tokenizer: Any, opset: int,
              diffs: dict[str, float]) -> dict[str, Any]:
    import onnx
    import onnxruntime

    from clipforge import __version__
    from clipforge.collection.embed import _weights_digest

    config = model.config
    text = config.text
    preprocess = None
    if transform is not None:
        preprocess = {"image_size": int(transform.image_size), "mean": list(transform.mean), "std": list(transform.std),
                      "resize_mode": transform.resize_mode, "interpolation": transform.interpolation,
                      "fill_color": int(transform.fill_color), "input_range": [0.0, 1.0],
                      "normalisation": "in the graph"}
    tokenizer_info = None
    if text is not None:
        hf = text.hf_tokenizer_name
        tokenizer_info = {"context_length": int(tokenizer.context_length), "clean": tokenizer.clean,
                          "hf_tokenizer_name": hf, "folder": TOKENIZER_DIR if hf else None,
                          "kwargs": dict(text.tokenizer_kwargs), "pool_type": text.pool_type,
                          "eos_id": int(text.eos_id), "pad_id": int(text.pad_id),
                          # cutting the ids after the last [EOS] changes nothing for these towers (CLIP.encode_text)
                          "trim_to_pooled": bool(text.causal and text.pool_type in ("argmax", "eos")
                                                 and not text.embed_cls)}
    return {
        "format": "clipforge-onnx", "format_version": FORMAT_VERSION, "model": source, "model_name": config.name,
        "config": config.to_dict(), "embed_dim": int(config.embed_dim),
        "logit_scale": float(model.logit_scale_value().detach()), "preprocess": preprocess,
        "tokenizer": tokenizer_info,
        "image": {"file": IMAGE_FILE, **IMAGE_NAMES} if transform is not None else None,
        "text": {"file": TEXT_FILE, **TEXT_NAMES} if text is not None else None,
        "opset": opset, "exporter": "torch.onnx (TorchScript)", "max_abs_diff": diffs,
        "weights_digest": _weights_digest(model),
        "versions": {"clipforge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }


def export_onnx(source: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                overwrite: bool = False, device: str | torch.device = "cpu", **load_options: Any) -> dict[str, Any]:
    """Export ``source`` (anything ``clipforge.load`` accepts) to ``out_dir``; returns the manifest written.

    ``load_options`` go to ``clipforge.load`` (quick_gelu, model, pretrained, image_size). The graphs are
    traced on ``device`` and always validated on the CPU with onnxruntime, to ``TOLERANCE``.
    """
    require_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ClipforgeError(f"--opset must be a whole number of at least {MIN_OPSET} (attention needs it), "
                             f"got {opset!r}")
    target = Path(out_dir).expanduser().absolute()
    _prepare_target(str(source), target, overwrite)
    from clipforge.checkpoints import load
    from clipforge.tokenizer.factory import get_tokenizer

    model, transform = load(source, device=device, **load_options)
    model = model.float().eval()
    tokenizer = get_tokenizer(model) if model.config.text is not None else None
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if transform is not None:
            size = int(model.config.vision.image_size)
            example = torch.from_numpy(_sample_pixels(size, 2, 0)).to(device)
            _export(ImageGraph(model, transform.mean, transform.std).to(device), example, staging / IMAGE_FILE,
                    IMAGE_NAMES, {"pixels": {0: "batch"}, "image_embeds": {0: "batch"},
                                  "image_features": {0: "batch"}}, opset)
        if tokenizer is not None:
            example = torch.from_numpy(_sample_ids(tokenizer, 2)).to(device)
            _export(TextGraph(model).to(device), example, staging / TEXT_FILE, TEXT_NAMES,
                    {"input_ids": {0: "batch", 1: "length"}, "text_embeds": {0: "batch"},
                     "text_features": {0: "batch"}}, opset)
            if model.config.text.hf_tokenizer_name:
                tokenizer.save_pretrained(staging / TOKENIZER_DIR)
        cpu_model = model.cpu()
        diffs = _validate(staging, cpu_model, tokenizer, model.config.vision.image_size if transform else None,
                          transform)
        manifest = _manifest(str(source), cpu_model, transform, tokenizer, opset, diffs)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder onto the target; an old export is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "export")
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old / "export", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    os.chmod(target, 0o777 & ~_umask())


def _umask() -> int:
    from clipforge.checkpoints.atomic import current_umask

    return current_umask()
