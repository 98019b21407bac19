"""Embed a collection into clip-retrieval's layout, resumably, on one process or many (``torchrun``).

The input list is cut into parts of ``part_size`` items in its fixed order. Part ``n`` goes to rank
``n % world_size``, which writes it whole (``layout.write_part``) when its last batch is encoded, so
a kill at any moment loses at most the parts in flight; a rerun skips every finished part (its
parquet is there, made from the same inputs with the same model and settings, and its arrays have
its row count) and removes what killed writers left behind. No rank waits for another: whichever
finds every part finished writes ``embed_info.json`` and ``skipped.tsv``, rebuilt from the parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipforge.collection import layout, resume
from clipforge.collection.layout import (
    EMB_DIRS,
    METADATA_DIR,
    SKIPPED_NAME,
    EmbedInfo,
)
from clipforge.collection.progress import Progress
from clipforge.collection.sources import ImageListSource, Source, open_source
from clipforge.data.skips import (
    SkipRecord,
)
from clipforge.errors import ClipforgeError
from clipforge.runtime import is_onnx_model

if TYPE_CHECKING:  # torch is imported where a torch model is used, so the ONNX path runs without it
    import torch

__all__ = ["embed_collection", "embed_image_files", "resolve_rank"]

_STORAGE = {"float16": np.float16, "float32": np.float32}


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else torchrun's (or SLURM's) environment, else (0, 1)."""
    def env(*names: str) -> int | None:
        for name in names:
            if os.environ.get(name, "").strip():
                try:
                    return int(os.environ[name])
                except ValueError:
                    raise ClipforgeError(f"environment variable {name}={os.environ[name]!r} is not a whole number; "
                                         "unset it or launch with torchrun") from None
        return None

    if rank is None:
        rank = env("RANK", "SLURM_PROCID")
    if world_size is None:
        world_size = env("WORLD_SIZE", "SLURM_NTASKS")
    rank, world_size = rank or 0, world_size or 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ClipforgeError(f"rank {rank} of world size {world_size} is impossible; ranks run from 0 to world size - 1")
    return rank, world_size


def _storage_dtype(dtype: Any) -> np.dtype:
    """The dtype the arrays are stored in: float16 (default, as clip-retrieval) or float32."""
    if type(dtype).__name__ == "dtype" and type(dtype).__module__ == "torch":  # a torch.dtype
        if str(dtype) == "torch.bfloat16":
            raise ClipforgeError("dtype is how embeddings are stored (float16 or float32); numpy cannot store "
                                 "bfloat16: pass precision='bf16' to compute in it")
        dtype = str(dtype).replace("torch.", "")
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _STORAGE:
        raise ClipforgeError(f"dtype must be float16 or float32, got {dtype!r}")
    return np.dtype(_STORAGE[name])


def _weights_digest(model: torch.nn.Module) -> str:
    """Config plus a cheap sample of the weights (sums of the first and last tensors): tells models apart
    without hashing gigabytes. An ONNX export gives its own (the torch model's, marked as ONNX)."""
    if is_onnx_model(model):
        return model.weights_digest()
    import torch

    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    h.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    for tensor in tensors[:8] + tensors[-8:]:  # float64 sums: the same on any device and thread count
        total = float(tensor.detach().sum(dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
        h.update(f"{tuple(tensor.shape)}:{total:.8e}:{norm:.8e}".encode())
    return h.hexdigest()


def _kinds(kind: str, source: Source) -> tuple[str, ...]:
    wanted = {"auto": source.kinds, "img": ("img",), "text": ("text",), "both": ("img", "text")}.get(kind)
    if wanted is None:
        raise ClipforgeError(f"kind must be auto, img, text or both, got {kind!r}")
    missing = [k for k in wanted if k not in source.kinds]
    if missing:
        what = "texts (a caption column)" if "text" in missing else "images"
        raise ClipforgeError(f"source '{source.spec[:120]}' has no {what} to embed; kind {kind!r} cannot be done")
    return tuple(wanted)


def _compute_dtype(model: Any, precision: str) -> Any:
    """The torch compute dtype for ``precision``; None for an ONNX export, which computes in float32."""
    if is_onnx_model(model):
        if precision not in ("auto", "fp32"):
            raise ClipforgeError(f"precision {precision!r} is not available for an ONNX export, which onnxruntime "
                                 "runs in float32; use precision fp32 (or auto)")
        return None
    from clipforge.collection.pipeline import model_device, precision_dtype

    return precision_dtype(precision, model_device(model))


def _backend(model: Any, compute: Any, note: Callable[[str], None]) -> tuple[Callable, Callable, Any]:
    """(encoder, batches, device): onnxruntime with threads for an ``OnnxCLIP``, else torch with DataLoader workers."""
    if is_onnx_model(model):
        from clipforge.collection.onnx_pipeline import OnnxEncoder, numpy_batches

        return OnnxEncoder(model), numpy_batches, None
    import torch

    from clipforge.collection.pipeline import Encoder, batches

    encoder = Encoder(model, torch.float32 if compute is None else compute, note)
    return encoder, batches, encoder.device


def _numpy(features: Any) -> np.ndarray:
    return features if isinstance(features, np.ndarray) else features.numpy()


def embed_image_files(model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor],
                      paths: Sequence[str | os.PathLike], *, batch_size: int = 64, num_workers: int = 2,
                      dtype: torch.dtype | None = None,
                      progress: bool = False) -> tuple[np.ndarray, list[int], list[SkipRecord]]:
    """(float32 L2-normalised embeddings of the readable images, their indices into paths, skip records).

    Decoding runs in ``num_workers`` DataLoader workers. ``dtype`` is the model's compute dtype
    (``for_inference``, default float32); a reduced one is checked against float32 on the first batch. Skip
    records name each unreadable file (``source``: the path) under a ``clipforge.data.skips`` reason. An
    ``OnnxCLIP`` (with its own ``preprocess``) runs on onnxruntime, in float32, without torch.
    """
    source = ImageListSource(paths)
    dim = int(model.config.embed_dim)
    if not len(source):
        return np.zeros((0, dim), np.float32), [], []
    encoder, batches, device = _backend(model, dtype, lambda line: print(line, flush=True))
    meter = Progress(len(source), "image", progress)
    chunks, kept, skips = [], [], []
    for _, batch in batches(source, [(0, 0, len(source))], preprocess=preprocess, tokenizer=None, image=True,
                            batch_size=batch_size, num_workers=num_workers, device=device):
        skips += [SkipRecord(0, source.name(i), reason, detail) for i, reason, detail in batch["skips"]]
        if batch["indices"]:
            chunks.append(_numpy(encoder(batch["pixels"], None)[0]))
            kept += batch["indices"]
        meter.update(batch["count"])
    meter.close()
    return (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)), kept, skips


def embed_collection(source: Source | str | os.PathLike, out_dir: str | os.PathLike, model: torch.nn.Module,
                     preprocess: Callable[[Any], torch.Tensor] | None, *, kind: str = "auto", batch_size: int = 64,
                     num_workers: int = 2, part_size: int = 10000, dtype: Any = "float16", precision: str = "auto",
                     rank: int | None = None, world_size: int | None = None, progress: bool = True,
                     model_info: Mapping[str, Any] | None = None) -> EmbedInfo:
    """Embed source (a ``Source`` or a path for ``open_source``) into out_dir in clip-retrieval's layout.

    ``kind``: auto (what the source offers), img, text or both (row-aligned). ``dtype``: how the arrays
    are stored (float16 or float32); ``precision``: what computes them (auto: bf16 where it is fast and
    agrees with float32, else fp32). ``rank``/``world_size``: this process's share (default: torchrun's
    environment). ``model_info``: model/pretrained/model_config/quick_gelu/image_size as the user gave
    them, for ``embed_info.json``. Returns the collection's ``EmbedInfo`` (``complete`` once every part
    of every rank is there; only then is it written to disk).
    """
    layout.require_pyarrow()
    src = source if isinstance(source, Source) else open_source(source)
    kinds = _kinds(kind, src)
    if batch_size < 1 or num_workers < 0 or part_size < 1:
        raise ClipforgeError(f"batch_size and part_size must be at least 1 and num_workers at least 0, got "
                             f"{batch_size}, {part_size} and {num_workers}")
    if "img" in kinds and preprocess is None:
        raise ClipforgeError("embedding images needs the model's preprocess transform; pass the one load() returned")
    rank, world = resolve_rank(rank, world_size)
    store = _storage_dtype(dtype)
    compute = _compute_dtype(model, precision)
    out = resume.prepare_out(Path(out_dir))
    for sub in [EMB_DIRS[k] for k in kinds] + [METADATA_DIR]:  # as clip-retrieval: only the kinds embedded
        (out / sub).mkdir(parents=True, exist_ok=True)
    total, parts = len(src), math.ceil(len(src) / part_size)
    width = len(str(parts))  # clip-retrieval's zero-padding
    given = dict(model_info or {})
    made_by = json.dumps([_weights_digest(model), store.name, list(kinds), part_size])
    settings = {"digest": hashlib.blake2b(made_by.encode(), digest_size=16).hexdigest(),
                "info": {"model": given.get("model"), "pretrained": given.get("pretrained"),
                         "model_config": given.get("model_config"), "quick_gelu": given.get("quick_gelu"),
                         "image_size": given.get("image_size"), "embed_dim": int(model.config.embed_dim),
                         "dtype": store.name, "kinds": list(kinds), "part_size": part_size,
                         "source": src.spec, "source_type": src.source_type}}
    metas = resume.check_settings(out, layout.scan_parts(out), settings)  # before anything is removed
    resume.clean(out, rank, world, parts, total, settings["info"])
    existing = layout.scan_parts(out)
    pending = []
    for n in range(rank, parts, world):
        start, stop = n * part_size, min(total, (n + 1) * part_size)
        if resume.finished(existing.get(n), metas.get(n), kinds, src.digest(start, stop), settings["digest"]):
            resume.rename(existing[n], width)
        else:
            pending.append(n)
    prefix = f"rank {rank}: " if world > 1 else ""
    if pending:
        _embed_parts(src, out, model, preprocess, kinds, pending, part_size=part_size, width=width, store=store,
                     compute=compute, batch_size=batch_size, num_workers=num_workers, settings=settings,
                     progress=Progress(sum(min(total, (n + 1) * part_size) - n * part_size for n in pending),
                                       "image" if "img" in kinds else "text", progress, prefix))
    elif progress:
        owned = len(range(rank, parts, world))
        print(f"{prefix}all {owned} parts of this process were already embedded" if owned else
              f"{prefix}no part to embed: {parts} parts for {world} processes", flush=True)
    info, records = resume.summary(out, src, parts, settings)
    if info.complete:
        info.write(out)
        resume.write_skipped(out / SKIPPED_NAME, records)
    return info














def _embed_parts(src: Source, out: Path, model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor] | None,
                 kinds: Sequence[str], pending: Sequence[int], *, part_size: int, width: int, store: np.dtype,
                 compute: torch.dtype | None, batch_size: int, num_workers: int, settings: Mapping[str, Any],
                 progress: Progress) -> None:
    """Encode the pending parts through one DataLoader, writing each part as soon as its last batch is done."""
    total = len(src)
    encoder, batches, device = _backend(model, compute, progress.say)
    tokenizer = None
    if "text" in kinds and is_onnx_model(model):
        tokenizer = model.tokenize
    elif "text" in kinds:
        from clipforge.tokenizer.factory import get_tokenizer

        tokenizer = get_tokenizer(model)
    plan = [(n, n * part_size, min(total, (n + 1) * part_size)) for n in pending]
    left = {n: len(range(start, stop, batch_size)) for n, start, stop in plan}
    bounds = {n: (start, stop) for n, start, stop in plan}
    acc: dict[int, dict[str, list]] = {}
    written = 0
    try:
        for n, batch in batches(src, plan, preprocess=preprocess if "img" in kinds else None, tokenizer=tokenizer,
                                image="img" in kinds, batch_size=batch_size, num_workers=num_workers, device=device):
            part = acc.setdefault(n, {"img": [], "text": [], "rows": [], "skips": []})
            part["skips"] += [[src.name(i), reason, detail] for i, reason, detail in batch["skips"]]
            if batch["indices"]:
                images, texts = encoder(batch["pixels"], batch["tokens"])
                for name, features in (("img", images), ("text", texts)):
                    if features is not None:
                        part[name].append(_numpy(features).astype(store))
                part["rows"] += batch["rows"]
            progress.update(batch["count"])
            left[n] -= 1
            if left[n] == 0:
                done = acc.pop(n)
                start, stop = bounds[n]
                arrays = {k: np.concatenate(done[k]) if done[k] else np.zeros((0, model.config.embed_dim), store)
                          for k in kinds}
                meta = {"version": 1, "part": n, "first": start, "items": stop - start, "rows": len(done["rows"]),
                        "digest": src.digest(start, stop), "settings": settings["digest"], "info": settings["info"],
                        "precision": encoder.precision, "kinds": list(kinds), "skipped": done["skips"]}
                layout.write_part(out, n, arrays, done["rows"], width=width, meta=meta)
                written += 1
                progress.part_done(n, written, len(pending), stop - start, len(done["rows"]), len(done["skips"]))
    finally:
        progress.close()

