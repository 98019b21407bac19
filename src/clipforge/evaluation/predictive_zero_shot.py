"""Zero-shot classification for the predictive objectives, on the same prompts and metrics as CLIP's.

A contrastive model scores a class by the cosine between the image and the class's prompt embeddings.
The predictive baselines of the paper's Figure 2 score by how likely the model finds the prompts:

* ``bow_prediction``: the mean predicted log-probability of each prompt's words (its bag, as in
  training), averaged over the templates: ``log_softmax(head(image)) @ mean_t bag(prompt_t)``.
* ``caption_lm``: the length-normalised log-likelihood of each prompt given the image (the mean over
  its tokens, [EOS] included, of the decoder's log-probability), averaged over the templates.

Both start from L2-normalised image embeddings, the ones ``evaluate_zero_shot`` caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipforge.evaluation.zero_shot import normalize_template
from clipforge.models import CLIP
from clipforge.tokenizer.factory import get_tokenizer
from clipforge.models.caption_targets import bag_of_words_target, caption_lengths

LOGITS_BUDGET = 1 << 26  # vocabulary logits held at once while scoring captions (256 MB in float32)


def _prompt_ids(model: CLIP, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C * T, L] ids, class-major, cut after the longest prompt's [EOS]."""
    templates = [normalize_template(t) for t in templates] or ["{}"]
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    ids = get_tokenizer(model)(prompts)
    return ids[:, : int(caption_lengths(ids).max())]


@torch.no_grad()
def bow_scores(model: CLIP, features: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[N, C] mean log-probability of each class's prompt words under each image's predicted bag."""
    ids = _prompt_ids(model, classnames, templates)
    vocab = model.bow_head.out_features
    bags = bag_of_words_target(ids, vocab).view(len(classnames), -1, vocab).mean(dim=1)  # [C, V]
    device = model.bow_head.weight.device
    log_probs = F.log_softmax(model.bow_logits(features.to(device)).float(), dim=-1)
    return (log_probs @ bags.to(device).t()).cpu()


@torch.no_grad()
def caption_scores(model: CLIP, features: torch.Tensor, classnames: Sequence[str],
                   templates: Sequence[str]) -> torch.Tensor:
    """[N, C] length-normalised log-likelihood of each class's prompts given each image (mean over templates)."""
    device = model.caption_prefix.weight.device
    ids = _prompt_ids(model, classnames, templates).to(device)
    prompts, length = ids.shape
    targets = ids[:, 1:]
    keep = torch.arange(1, length, device=device) < caption_lengths(ids)[:, None]  # word 1 .. [EOS]
    images_at_once = max(1, LOGITS_BUDGET // (prompts * length * model.vocab_size))
    rows = []
    for start in range(0, features.shape[0], images_at_once):
        part = features[start:start + images_at_once].to(device)
        n = part.shape[0]
        logits = model.caption_logits(part.repeat_interleave(prompts, dim=0), ids.repeat(n, 1))[:, :-1]
        token_log_probs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.repeat(n, 1).unsqueeze(-1))[..., 0]
        mask = keep.repeat(n, 1)
        per_prompt = (token_log_probs * mask).sum(dim=-1) / mask.sum(dim=-1)
        rows.append(per_prompt.view(n, len(classnames), -1).mean(dim=-1).cpu())
    return torch.cat(rows)


def predictive_scores(model: CLIP, features: torch.Tensor, classnames: Sequence[str],
                      templates: Sequence[str]) -> torch.Tensor:
    """The zero-shot scores of a model trained with a predictive objective (``model.config.predictive_head``)."""
    if model.config.predictive_head == "bow_prediction":
        return bow_scores(model, features, classnames, templates)
    return caption_scores(model, features, classnames, templates)
