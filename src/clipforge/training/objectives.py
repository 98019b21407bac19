"""The paper's three pre-training objectives (Section 2.3, Figure 2), as losses on model outputs.

``contrastive`` is ``loss.clip_loss``. The two predictive baselines the paper compared it with:

* ``bow_prediction``: predict the caption's bag of words from the image embedding. Our reading of the
  baseline: a softmax over the vocabulary trained with cross-entropy against the caption's word
  distribution (each word's count over the caption's word count), as in Joulin et al. (2016), whom the
  paper's bag-of-words baseline follows. [SOT], [EOS] and padding are not words.
* ``caption_lm``: a causal language model predicts each caption token from the image and the tokens
  before it (VirTex-style); the loss is the mean cross-entropy of the next-token predictions from [SOT]
  up to and including [EOS].

Both take token ids as ``tokenize`` gives them: [SOT], tokens, [EOS] (the largest id), zero padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.models.caption_targets import bag_of_words_target, caption_lengths, word_mask
from clipforge.training.config import OBJECTIVES  # noqa: F401 (the names, next to their losses)


def bow_prediction_terms(logits: Tensor, ids: Tensor) -> tuple[Tensor, int]:
    """(sum over captions with words of -sum_w target(w) log softmax(logits)(w), number of such captions)."""
    target = bag_of_words_target(ids, logits.shape[-1])
    per_caption = -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    has_words = target.sum(dim=-1) > 0
    return per_caption[has_words].sum(), int(has_words.sum())


def bow_prediction_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """The mean of ``bow_prediction_terms`` over captions that have words (0 if none has)."""
    total, count = bow_prediction_terms(logits, ids)
    return total / max(count, 1)


def caption_lm_terms(logits: Tensor, ids: Tensor) -> tuple[Tensor, int]:
    """(summed next-token cross-entropy, number of predicted tokens): ``logits[:, t]`` predicts
    ``ids[:, t + 1]`` for t + 1 up to [EOS]. ``logits``: [N, L, V] from a causal decoder fed ``ids[:, :L]``."""
    length = logits.shape[1]
    targets = ids[:, 1:length + 1].long()
    positions = torch.arange(1, targets.shape[1] + 1, device=ids.device)
    keep = positions < caption_lengths(ids)[:, None]  # predicted tokens: word 1 .. [EOS]
    total = F.cross_entropy(logits[:, :targets.shape[1]].float()[keep], targets[keep], reduction="sum")
    return total, int(keep.sum())


def caption_lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``caption_lm_terms``."""
    total, count = caption_lm_terms(logits, ids)
    return total / max(count, 1)


def predictive_step(model: nn.Module, images: Tensor, texts: Tensor, *, micro_batch: int | None,
                    chunk_size: int | None = None, autocast: Callable = contextlib.nullcontext,
                    no_sync: Callable | None = None, scaler: Any | None = None) -> dict[str, Any]:
    """``contrastive_step``'s contract for the predictive objectives: accumulate ``.grad`` of the batch's
    mean loss (exactly, over micro-batches too: each part adds its sum over the batch's count).

    ``model``: a CLIP with a ``predictive_head`` (or DDP around one); forwards go through it
    (``model(images, texts, predict=True)``). ``chunk_size`` is unused (no similarity matrix).
    """
    clip = getattr(model, "module", model)
    terms = bow_prediction_terms if clip.config.predictive_head == "bow_prediction" else caption_lm_terms
    n = images.shape[0]
    if texts.shape[0] != n:
        raise ValueError(f"{n} images but {texts.shape[0]} texts; a batch holds pairs")
    rows = [slice(start, start + (micro_batch or n)) for start in range(0, n, micro_batch or n)]
    if clip.config.predictive_head == "bow_prediction":
        count = int(word_mask(texts).any(dim=1).sum())  # captions with words
    else:
        count = int((caption_lengths(texts) - 1).sum())
    count = max(count, 1)
    if no_sync is None:
        no_sync = getattr(model, "no_sync", None)
    scale_loss = scaler.scale if scaler is not None else (lambda loss: loss)
    total = torch.zeros((), device=images.device)
    for index, part in enumerate(rows):
        last = index == len(rows) - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with autocast():
                logits = model(images[part], texts[part], predict=True)
            loss, _ = terms(logits, texts[part])
            scale_loss(loss / count).backward()
        total += loss.detach()
    return {"loss": total / count, "logit_scale": float(clip.logit_scale_value().detach())}


def training_step(objective: str) -> Callable[..., dict[str, Any]]:
    """The step function ``clipforge train`` runs for ``objective``."""
    if objective == "contrastive":
        from clipforge.training.grad_cache import contrastive_step

        return contrastive_step
    return predictive_step
