"""One contrastive training step at any batch size: gradient caching (Gao et al., 2021).

The contrastive loss couples every pair in the batch, so plain gradient accumulation changes the
objective. Gradient caching keeps it exact: embed everything without a graph, take the loss's
gradient with respect to the features, then re-run the towers one micro-batch at a time and
backpropagate those cached feature gradients. Peak activation memory is one micro-batch's.

Exactness holds wherever a micro-batch's features do not depend on the rest of the batch: ViTs,
and any model in eval mode. A ResNet in train mode normalises with per-micro-batch BatchNorm
statistics, so its features (and gradients) depend on ``micro_batch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from clipforge.training.loss import clip_loss

ContextFactory = Callable[[], contextlib.AbstractContextManager]


def device_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def contrastive_step(model: nn.Module, images: Tensor, texts: Tensor, *, micro_batch: int | None,
                     chunk_size: int | None = None, autocast: ContextFactory = contextlib.nullcontext,
                     no_sync: ContextFactory | None = None, scaler: Any | None = None) -> dict[str, Any]:
    """Compute this rank's loss and accumulate ``.grad``, equal to a full-batch backward.

    ``model``: a CLIP, or a ``DistributedDataParallel`` wrapping one; forwards run through the
    wrapper (``model(images, texts, return_features=True)``) so DDP all-reduces, and ``no_sync`` defaults to the
    wrapper's ``no_sync``: every micro-batch but the last accumulates locally, so gradients are
    all-reduced once. ``micro_batch``: pairs per tower pass; None (or >= the batch) is one plain
    forward/backward. ``chunk_size``: rows of logits at once in ``clip_loss``. ``autocast``: a
    factory for the mixed-precision context. ``scaler``: an optional ``GradScaler`` (fp16) whose
    ``scale`` multiplies the loss before backward. Returns ``{"loss": detached scalar,
    "logit_scale": float}``.
    """
    clip = getattr(model, "module", model)
    n = images.shape[0]
    if texts.shape[0] != n:
        raise ValueError(f"{n} images but {texts.shape[0]} texts; a batch holds pairs")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive integer, got {micro_batch}")
    scale_loss = scaler.scale if scaler is not None else (lambda loss: loss)

    if micro_batch is None or micro_batch >= n:
        with autocast():
            image_features, text_features, logit_scale = model(images, texts, return_features=True)
        loss = clip_loss(image_features, text_features, logit_scale, chunk_size=chunk_size)
        scale_loss(loss).backward()
        return {"loss": loss.detach(), "logit_scale": logit_scale.detach().item()}

    if no_sync is None:
        no_sync = getattr(model, "no_sync", None)
    device = images.device
    slices = [slice(start, start + micro_batch) for start in range(0, n, micro_batch)]

    # 1. Embed without a graph. Remember the RNG state before each micro-batch so its re-forward
    #    draws the same randomness, and the buffers so BatchNorm statistics update only once.
    rng_states, image_parts, text_parts = [], [], []
    buffers = [buffer.clone() for buffer in clip.buffers()]
    with torch.no_grad(), autocast():
        for rows in slices:
            rng_states.append(device_rng_state(device))
            image_parts.append(clip.encode_image(images[rows], normalize=True))
            text_parts.append(clip.encode_text(texts[rows], normalize=True))
    rng_after = device_rng_state(device)
    with torch.no_grad():
        for buffer, saved in zip(clip.buffers(), buffers):
            buffer.copy_(saved)

    # 2. The loss on leaf features (gathered across ranks inside clip_loss) and its gradients.
    image_features = torch.cat(image_parts).requires_grad_()
    text_features = torch.cat(text_parts).requires_grad_()
    logit_scale = clip.logit_scale_value().detach().requires_grad_()
    loss = clip_loss(image_features, text_features, logit_scale, chunk_size=chunk_size)
    image_grads, text_grads, scale_grad = torch.autograd.grad(
        scale_loss(loss), [image_features, text_features, logit_scale])
    del image_parts, text_parts, image_features, text_features

    # 3. Re-forward each micro-batch with a graph and push the cached gradients through it.
    #    The scale's gradient rides on the last one, once, so DDP sees every parameter used there.
    for index, rows in enumerate(slices):
        last = index == len(slices) - 1
        set_device_rng_state(rng_states[index], device)
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with autocast():
                image_out, text_out, scale_out = model(images[rows], texts[rows], return_features=True)
            pairs = [(image_out, image_grads[rows]), (text_out, text_grads[rows])]
            pairs += [(scale_out, scale_grad)] if last else []
            pairs = [(out, grad.to(out.dtype)) for out, grad in pairs if out.requires_grad]  # frozen parts
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    set_device_rng_state(rng_after, device)
    return {"loss": loss.detach(), "logit_scale": logit_scale.detach().item()}
