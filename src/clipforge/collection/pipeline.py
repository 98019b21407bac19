"""The embedding pipeline: DataLoader workers decode and preprocess while the main process runs the model.

Decoding a JPEG costs as much as a small model's forward pass, so it must never sit on the model's
path: workers read, decode, preprocess and tokenize whole batches (``collate`` runs in the worker)
and keep several batches ready (``prefetch_factor``); the main process only moves tensors to the
device and encodes. Batches never straddle a part, so a part is complete the moment its last batch
is encoded. The model runs through ``CLIP.for_inference``; bfloat16 is used only where it is fast
and, measured on the first batch, agrees with float32 to a cosine of at least ``AGREEMENT``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from clipforge.collection.progress import Progress  # noqa: F401 (here before it had its own module)
from clipforge.collection.sources import Source, Unusable
from clipforge.data.skips import UNREADABLE_IMAGE

AGREEMENT = 0.999  # least per-row cosine between bf16 and float32 embeddings for bf16 to be kept
PREFETCH = 4  # batches each worker keeps ready
PRECISIONS = ("auto", "fp32", "bf16")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are native here: a GPU with bf16, or a CPU with AVX-512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 where bf16 is fast, else float32."""
    if precision not in PRECISIONS:
        from clipforge.errors import ClipforgeError

        raise ClipforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.bfloat16
    return torch.float32


def model_device(model: torch.nn.Module) -> torch.device:
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.device
    return next(model.parameters()).device


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


class Encoder:
    """Encodes batches with ``model.for_inference(dtype)``; a reduced dtype is checked against float32 on the
    first batch and replaced by float32 (with a one-line note) if any row's cosine falls below AGREEMENT."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, note: Callable[[str], None]) -> None:
        from clipforge.models.clip import InferenceCLIP

        self.note = note
        self.device = model_device(model)
        if isinstance(model, InferenceCLIP):  # already frozen: used as given
            self.model, self.fast, self.dtype = None, model, model.dtype
        else:
            self.model, self.fast, self.dtype = model, model.for_inference(dtype), dtype
        self.checked = self.model is None or dtype == torch.float32

    @property
    def precision(self) -> str:
        return dtype_name(self.dtype)

    def __call__(self, pixels: torch.Tensor | None,
                 tokens: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if pixels is not None:
            pixels = pixels.to(self.device, non_blocking=True)
        if tokens is not None:
            tokens = tokens.to(self.device, non_blocking=True)
        if not self.checked:
            self._check(pixels, tokens)
        images = self.fast.encode_image(pixels, normalize=True).float().cpu() if pixels is not None else None
        texts = self.fast.encode_text(tokens, normalize=True).float().cpu() if tokens is not None else None
        return images, texts

    def _check(self, pixels: torch.Tensor | None, tokens: torch.Tensor | None) -> None:
        model = self.model
        weights = next(model.parameters()).dtype
        reference = model if weights == torch.float32 else model.for_inference(torch.float32)
        worst, what = 1.0, ""
        with torch.no_grad():
            for name, x, encode in (("image", pixels, "encode_image"), ("text", tokens, "encode_text")):
                if x is None or len(x) == 0:
                    continue
                exact = getattr(reference, encode)(x, normalize=True).float()
                fast = getattr(self.fast, encode)(x, normalize=True).float()
                cosine = float((exact * fast).sum(-1).min())
                if cosine < worst:
                    worst, what = cosine, name
        if worst < AGREEMENT:
            self.note(f"note: {self.precision} {what} embeddings agree with float32 only to cosine {worst:.5f} on the "
                      f"first batch (< {AGREEMENT}); using float32")
            self.fast, self.dtype = model.for_inference(torch.float32), torch.float32
        self.checked, self.model = True, None


class _Items(Dataset):
    """Item i of the source, preprocessed: (i, pixels, caption, row, skip reason, skip detail)."""

    def __init__(self, source: Source, preprocess: Callable[[Any], torch.Tensor] | None, image: bool,
                 text: bool) -> None:
        self.source, self.preprocess, self.image, self.text = source, preprocess, image, text

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple:
        try:
            loaded = self.source.load(index, image=self.image, text=self.text)
            pixels = self.preprocess(loaded.image) if self.image else None  # type: ignore[misc]
        except Unusable as bad:
            return index, None, None, None, bad.reason, bad.detail
        except Exception as error:  # noqa: BLE001 (a file that breaks the transform is a bad image, not a dead run)
            return index, None, None, None, UNREADABLE_IMAGE, f"{type(error).__name__}: {error}"
        return index, pixels, loaded.caption, loaded.row, None, None


class _Collate:
    """Stacks a batch's usable items and tokenizes their captions, in the worker."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None, image: bool) -> None:
        self.tokenizer, self.image = tokenizer, image

    def __call__(self, items: list[tuple]) -> dict[str, Any]:
        good = [item for item in items if item[4] is None]
        pixels = torch.stack([item[1] for item in good]) if self.image and good else None
        tokens = self.tokenizer([item[2] for item in good]) if self.tokenizer is not None and good else None
        return {"indices": [item[0] for item in good], "rows": [item[3] for item in good], "pixels": pixels,
                "tokens": tokens, "skips": [(item[0], item[4], item[5]) for item in items if item[4] is not None],
                "count": len(items)}


class _PartBatches:
    """Index lists of batch_size within each (part, start, stop), in order: a batch never straddles two parts."""

    def __init__(self, plan: Sequence[tuple[int, int, int]], batch_size: int) -> None:
        self.plan, self.batch_size = list(plan), batch_size

    def owners(self) -> Iterator[int]:
        for part, start, stop in self.plan:
            yield from [part] * len(range(start, stop, self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for _, start, stop in self.plan:
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(len(range(start, stop, self.batch_size)) for _, start, stop in self.plan)


def batches(source: Source, plan: Sequence[tuple[int, int, int]], *, preprocess: Callable[[Any], torch.Tensor] | None,
            tokenizer: Callable[[list[str]], torch.Tensor] | None, image: bool, batch_size: int, num_workers: int,
            device: torch.device) -> Iterator[tuple[int, dict[str, Any]]]:
    """(part, batch) for every batch of the plan, in order, read and preprocessed by ``num_workers`` workers."""
    sampler = _PartBatches(plan, batch_size)
    loader = DataLoader(_Items(source, preprocess, image, tokenizer is not None), batch_sampler=sampler,
                        num_workers=num_workers, collate_fn=_Collate(tokenizer, image),
                        pin_memory=device.type == "cuda", prefetch_factor=PREFETCH if num_workers else None,
                        persistent_workers=False)
    iterator = iter(loader)
    try:
        yield from zip(sampler.owners(), iterator)
    finally:
        del iterator  # stops the workers at once if the caller stops early
