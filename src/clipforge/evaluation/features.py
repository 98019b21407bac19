"""Frozen CLIP features for evaluation: batched, with progress bars, skipped bad images, and a disk cache.

Every evaluation (zero-shot, linear probe, retrieval) starts from L2-normalised image features, so
they are computed once here. The cache key covers the weights, the dataset's identity, the
preprocessing and the precision, so a cached file is never reused for a different model or input.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipforge.checkpoints.atomic import atomic_write
from clipforge.errors import ClipforgeError
from clipforge.models.clip import CLIP
from clipforge.tokenizer import tokenize

PRECISIONS = ("fp32", "bf16", "fp16")


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
    """(pixels, index) per item, or (None, index, reason) for an image that cannot be decoded."""

    def __init__(self, dataset: Dataset, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        try:
            image = self.dataset[index][0]
            return self.preprocess(image), index, None
        except Exception as error:  # noqa: BLE001 (a bad file is counted and skipped, never a dead eval)
            return None, index, f"{type(error).__name__}: {error}"


def _collate(items):
    good = [(pixels, index) for pixels, index, _ in items if pixels is not None]
    bad = [(index, reason) for pixels, index, reason in items if pixels is None]
    pixels = torch.stack([p for p, _ in good]) if good else None
    return pixels, torch.tensor([i for _, i in good], dtype=torch.long), bad


def _cache_path(cache_dir: str | os.PathLike | None, *parts: str) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()
    return Path(cache_dir) / f"image_features_{key}.safetensors"


@torch.no_grad()
def image_features(model: CLIP, dataset: Dataset, preprocess: Callable[[Any], torch.Tensor], *,
                   batch_size: int = 128, num_workers: int = 2, precision: str = "fp32",
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   description: str = "image features") -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(features [n, E] float32 normalised, dataset indices [n], skipped counts) for every decodable item.

    Items whose image cannot be read are left out and counted under ``skipped["unreadable_image"]``
    (the first reason is printed); metrics are then computed over the rest.
    """
    device = next(model.parameters()).device
    identity = getattr(dataset, "identity", None)
    cache = _cache_path(cache_dir, model_fingerprint(model), str(identity), repr(preprocess), precision) \
        if identity is not None else None
    if cache is not None and cache.is_file():
        stored = load_file(str(cache))
        return stored["features"], stored["indices"], {"unreadable_image": int(stored["skipped"].item())}
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
        raise ClipforgeError(f"no image of the dataset ({len(dataset)} items) could be read; first error: "
                             f"{bad[0][1] if bad else 'the dataset is empty'}")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s); first: item {bad[0][0]}: {bad[0][1]}")
    result = torch.cat(features), torch.cat(indices), {"unreadable_image": len(bad)}
    if cache is not None:
        tensors = {"features": result[0], "indices": result[1], "skipped": torch.tensor(len(bad))}
        atomic_write(cache, lambda tmp: save_file(tensors, str(tmp)))
    return result


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
