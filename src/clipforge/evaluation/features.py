"""Frozen CLIP features for evaluation: batched, with progress bars, skipped bad images, and a disk cache.

Every evaluation (zero-shot, linear probe, retrieval) starts from L2-normalised image features, so
they are computed once here. The cache key covers the weights, the dataset's identity, the
preprocessing and the precision, so a cached file is never reused for a different model or input.
An image that cannot be used (a missing file, a dangling link, a corrupt image) is skipped, counted
under the same reason names training uses, and named, so a report can list every one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipforge.checkpoints.atomic import atomic_write
from clipforge.data.skips import MISSING_FILE, UNREADABLE_IMAGE, format_counts
from clipforge.errors import ClipforgeError
from clipforge.models.clip import CLIP
from clipforge.tokenizer import tokenize

PRECISIONS = ("fp32", "bf16", "fp16")
_CACHE_VERSION = "2"  # 2: the cache also stores which items were skipped and why
_WARN_NAMES = 5  # skipped files named on the console; the result JSON lists them all


def skip_reason(path: str | None) -> str:
    """Why an item whose image failed to decode is skipped: its file is not there (or is a dangling link or
    a link loop), or it is there but is not a readable image."""
    return MISSING_FILE if path is not None and not os.path.exists(path) else UNREADABLE_IMAGE


def reason_counts(skipped: Sequence[dict[str, Any]]) -> dict[str, int]:
    """{reason: how many} of skipped-item records, in a stable order."""
    counts: dict[str, int] = {}
    for item in skipped:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    return dict(sorted(counts.items()))


def model_fingerprint(model: CLIP) -> str:
    """A hash of the architecture and every weight: two models share cached features only if equal."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(model.config.to_dict()).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def autocast_for(device: torch.device, precision: str):
    """Autocast context for a precision name; fp32 runs without one."""
    if precision not in PRECISIONS:
        raise ClipforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _Preprocessed(Dataset):
    """(pixels, index, None) per item, or (None, index, skip record) for an image that cannot be used."""

    def __init__(self, dataset: Dataset, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        try:
            image = self.dataset[index][0]
            return self.preprocess(image), index, None
        except Exception as error:  # noqa: BLE001 (a bad file is counted and skipped, never a dead eval)
            path_of = getattr(self.dataset, "path_of", None)
            path = path_of(index) if path_of is not None else None
            detail = str(error) if isinstance(error, ClipforgeError) else f"{type(error).__name__}: {error}"
            return None, index, {"item": index, "path": path if path is not None else f"item {index}",
                                 "reason": skip_reason(path), "error": " ".join(detail.split())}


def _collate(items):
    good = [(pixels, index) for pixels, index, _ in items if pixels is not None]
    bad = [record for pixels, _, record in items if pixels is None]
    pixels = torch.stack([p for p, _ in good]) if good else None
    return pixels, torch.tensor([i for _, i in good], dtype=torch.long), bad


def _cache_path(cache_dir: str | os.PathLike | None, *parts: str) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.blake2b("\x00".join((_CACHE_VERSION, *parts)).encode(), digest_size=16).hexdigest()
    return Path(cache_dir) / f"image_features_{key}.safetensors"


@torch.no_grad()
def image_features(model: CLIP, dataset: Dataset, preprocess: Callable[[Any], torch.Tensor], *,
                   batch_size: int = 128, num_workers: int = 2, precision: str = "fp32",
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   description: str = "image features",
                   skipped_items: list[dict[str, Any]] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(features [n, E] float32 normalised, dataset indices [n], skipped counts by reason) for every usable item.

    Items whose image cannot be used are left out and counted by reason (``missing_file``,
    ``unreadable_image``); metrics are then computed over the rest. ``skipped_items``, if given, receives
    one record per skipped item: ``{"item", "path", "reason", "error"}``.
    """
    if batch_size < 1 or num_workers < 0:
        raise ClipforgeError(f"batch_size must be at least 1 and num_workers at least 0, got {batch_size} and "
                             f"{num_workers}")
    device = next(model.parameters()).device
    identity = getattr(dataset, "identity", None)
    cache = _cache_path(cache_dir, model_fingerprint(model), str(identity), repr(preprocess), precision) \
        if identity is not None else None
    cached = _read_cache(cache) if cache is not None and cache.is_file() else None
    if cached is not None:
        features, indices, bad = cached
    else:
        features, indices, bad = _compute(model, dataset, preprocess, device, batch_size, num_workers, precision,
                                          progress, description)
        if cache is not None:
            tensors = {"features": features, "indices": indices}
            atomic_write(cache, lambda tmp: save_file(tensors, str(tmp), metadata={"skipped": json.dumps(bad)}))
    counts = reason_counts(bad)
    if bad:
        names = ", ".join(f"{item['path']} ({item['reason']})" for item in bad[:_WARN_NAMES])
        names = names.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name that is not UTF-8
        more = f" and {len(bad) - _WARN_NAMES} more" if len(bad) > _WARN_NAMES else ""
        print(f"warning: {description}: skipped {len(bad)} of {len(dataset)} images "  # type: ignore[arg-type]
              f"({format_counts(counts)}): {names}{more}", flush=True)
    if skipped_items is not None:
        skipped_items.extend(bad)
    return features, indices, counts


def _read_cache(cache: Path) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]] | None:
    """A cache file's features, indices and skip records; None (compute afresh) when it is damaged."""
    try:
        with safe_open(str(cache), framework="pt") as stored:
            bad = json.loads((stored.metadata() or {}).get("skipped", "[]"))
            return stored.get_tensor("features"), stored.get_tensor("indices"), list(bad)
    except Exception as error:  # noqa: BLE001 (a truncated cache is only lost time, never a failed eval)
        print(f"warning: ignoring damaged feature cache {cache} ({type(error).__name__}); computing afresh")
        return None


def _compute(model: CLIP, dataset: Dataset, preprocess: Callable[[Any], torch.Tensor], device: torch.device,
             batch_size: int, num_workers: int, precision: str, progress: bool,
             description: str) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    loader = DataLoader(_Preprocessed(dataset, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, shuffle=False)
    features, indices, bad = [], [], []
    model.eval()
    for pixels, index, failures in tqdm(loader, desc=description, disable=not progress, unit="batch"):
        bad.extend(failures)
        if pixels is None:
            continue
        with autocast_for(device, precision):
            features.append(model.encode_image(pixels.to(device), normalize=True).float().cpu())
        indices.append(index)
    if not features:
        first = f"{bad[0]['path']}: {bad[0]['error']}" if bad else "the dataset is empty"
        raise ClipforgeError(f"no image of the dataset ({len(dataset)} items) could be read "  # type: ignore[arg-type]
                             f"(first: {first[:200]}); check the dataset path and its files")
    return torch.cat(features), torch.cat(indices), bad


@torch.no_grad()
def text_features(model: CLIP, texts: Sequence[str], *, batch_size: int = 256, precision: str = "fp32",
                  progress: bool = False, description: str = "text features") -> torch.Tensor:
    """[len(texts), E] float32 normalised features; over-long texts are truncated as open_clip does."""
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=description, disable=not progress, unit="batch"):
        tokens = tokenize(list(texts[start:start + batch_size]), model.context_length, truncate=True).to(device)
        with autocast_for(device, precision):
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    if not chunks:
        raise ClipforgeError("no texts to embed")
    return torch.cat(chunks)
