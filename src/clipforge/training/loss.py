"""CLIP's symmetric contrastive (InfoNCE) loss: exact at any batch size, sharded like the paper.

Each rank holds ``b`` image/text pairs of a global batch of ``N = W * b``. ``clip_loss`` gathers
the features of every rank (with gradient) and computes only this rank's ``b`` rows of the
``N x N`` similarity matrix, in both directions, ``chunk_size`` rows at a time, so no more than
``chunk_size x N`` logits ever exist, in forward or in backward.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

LOGITS_BUDGET = 1 << 24  # default most logits alive at once (64 MiB in float32)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """[b, E] on each of W ranks -> [W*b, E] in rank order, differentiable.

    ``torch.distributed.nn.functional.all_gather``'s backward *sums* the gradients that every
    rank computed for a slice (reduce-scatter with SUM), so the gradient arriving at rank r's
    ``x`` is d(sum over ranks of their losses)/dx_r. Every rank must hold the same ``b``.
    """
    if _world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of functional collectives, which lack gloo backward
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat(parts, dim=0)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays fp64


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse_i = logsumexp_j(scale * q_i . k_j) for every query row, ``chunk`` rows at a time.

    Saves only q, k, scale and the [b] result; backward recomputes each chunk's logits, so peak
    memory is O(chunk x N) instead of the O(b x N) autograd would keep for softmax. Products and
    sums run in float32 (float64 for float64 inputs) whatever the feature dtype.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        acc = _acc_dtype(queries.dtype)
        s = scale.detach().to(acc).reshape(())
        lse = torch.empty(queries.shape[0], dtype=acc, device=queries.device)
        keys_acc = keys.to(acc)  # bf16 logits would be off by ~0.4 at scale 100: multiply in fp32
        for start in range(0, queries.shape[0], chunk):
            logits = (queries[start:start + chunk].to(acc) @ keys_acc.T).mul_(s)
            row_max = logits.amax(dim=1, keepdim=True)  # logsumexp, in place: one chunk alive
            lse[start:start + chunk] = logits.sub_(row_max).exp_().sum(dim=1).log_().add_(row_max[:, 0])
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        queries, keys, scale, lse = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        acc = _acc_dtype(queries.dtype)
        s = scale.to(acc).reshape(())
        grad_lse = grad_lse.to(acc)
        grad_q = torch.empty(queries.shape, dtype=acc, device=queries.device) if need_q else None
        grad_k = torch.zeros(keys.shape, dtype=acc, device=keys.device) if need_k else None
        grad_s = torch.zeros((), dtype=acc, device=queries.device)
        keys_acc = keys.to(acc)
        for start in range(0, queries.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            q = queries[rows].to(acc)
            # d lse_i / d logit_ij = softmax_ij, weighted by row i's incoming gradient (in place: one chunk alive)
            weights = (q @ keys_acc.T).mul_(s).sub_(lse[rows, None]).exp_().mul_(grad_lse[rows, None])
            if need_q or need_s:
                pulled = weights @ keys_acc  # d/dq of sum_ij w_ij q_i.k_j, before the factor s
                if need_s:  # d logit_ij / d s = q_i.k_j, so d/ds = sum_i q_i . pulled_i
                    grad_s += torch.dot(q.flatten(), pulled.flatten())
                if need_q:
                    grad_q[rows] = pulled
            if need_k:
                grad_k += weights.T @ q
        return (grad_q.mul_(s).to(queries.dtype) if need_q else None,
                grad_k.mul_(s).to(keys.dtype) if need_k else None,
                grad_s.to(scale.dtype).reshape(scale.shape) if need_s else None,
                None)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, *,
              chunk_size: int | None = None) -> Tensor:
    """The paper's symmetric cross-entropy over the global batch, for this rank's rows.

    ``image_features``/``text_features``: this rank's L2-normalised [b, E] features, pair i with
    pair i. ``logit_scale``: the temperature multiplier already exp'ed and clamped
    (``model.logit_scale_value()``). Returns 0.5 * (mean CE image->text + mean CE text->image)
    over the local rows, in float32 (float64 for float64 inputs).

    Why DDP gets the exact full-batch gradient: the global loss is L = (1/W) sum_r loss_r (every
    rank has b rows). Rank r backpropagates loss_r; the gather's backward sums every rank's
    gradient for x_r, so rank r's features receive d(sum_r' loss_r')/dx_r = W dL/dx_r and its
    parameter gradient is W * (dL/dx_r)(dx_r/dtheta). DDP averages over ranks:
    (1/W) sum_r W (dL/dx_r)(dx_r/dtheta) = dL/dtheta. The scale is not gathered, so rank r's
    scale gradient is d loss_r/ds, whose average is dL/ds.

    ``chunk_size``: most query rows whose logits exist at once; by default all ``b`` rows, or
    fewer so that no more than ``LOGITS_BUDGET`` logits are alive.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"expected two [b, E] feature tensors of one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if not isinstance(logit_scale, Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=image_features.device)
    all_images = gather_with_grad(image_features)
    all_texts = gather_with_grad(text_features)
    b, n = image_features.shape[0], all_images.shape[0]
    chunk = chunk_size or (b if b * n <= LOGITS_BUDGET else max(1, LOGITS_BUDGET // n))
    acc = _acc_dtype(image_features.dtype)
    lse_images = _ChunkedLogSumExp.apply(image_features, all_texts, logit_scale, chunk)
    lse_texts = _ChunkedLogSumExp.apply(text_features, all_images, logit_scale, chunk)
    # Row i's label is column rank*b + i, i.e. this rank's own pair: the same logit both ways.
    positives = (image_features.to(acc) * text_features.to(acc)).sum(dim=1) * logit_scale.to(acc).reshape(())
    return 0.5 * (lse_images.mean() + lse_texts.mean()) - positives.mean()


def naive_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Reference: the full N x N logits and ``F.cross_entropy`` both ways, on one process."""
    logits = (logit_scale * image_features @ text_features.T).to(_acc_dtype(image_features.dtype))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
