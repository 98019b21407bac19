"""Classification and retrieval metrics on precomputed scores, as the CLIP papers and CLIP_benchmark define them."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top1/top5 accuracy, mean per-class recall (balanced accuracy) and the confusion matrix.

    Top-k counts a hit when the label is among the k highest scores (``torch.topk``, as
    CLIP_benchmark). Mean per-class recall averages recall over the classes present in ``labels``,
    like sklearn's ``balanced_accuracy_score``. ``confusion[i, j]`` counts label i predicted as j.
    """
    labels = labels.long()
    metrics: dict = {"num_samples": int(labels.numel()), "num_classes": num_classes}
    for k in (1, 5):
        if k <= num_classes:
            top = scores.topk(k, dim=1).indices
            metrics[f"top{k}"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    predicted = scores.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    present = support > 0
    recall = confusion.diagonal()[present].double() / support[present].double()
    metrics["mean_per_class_recall"] = recall.mean().item()
    metrics["confusion"] = confusion
    return metrics


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Recall@k in both directions with several captions per image, as in the CLIP papers.

    image_to_text R@k: the share of images with at least one of their captions among the k
    texts most similar to them. text_to_image R@k: the share of captions whose image is among
    the k most similar images. ``text_image[t]`` is the image index of caption t. A candidate
    ties with the true match only if scores are exactly equal; ties count in the query's favour.
    """
    text_image = text_image.long()
    num_images = len(image_features)
    text_ranks = []
    for start in range(0, len(text_features), chunk):  # text -> image: rank of the caption's own image
        scores = text_features[start:start + chunk] @ image_features.t()
        own = scores.gather(1, text_image[start:start + chunk, None])
        text_ranks.append((scores > own).sum(dim=1))
    text_rank = torch.cat(text_ranks)
    image_rank = torch.zeros(num_images, dtype=torch.long)
    for start in range(0, num_images, chunk):  # image -> text: rank of the best-scoring own caption
        # The own captions' scores come from this same product: a product of another shape can round
        # differently (threaded BLAS), and a caption must never be ranked against its own other rounding.
        scores = image_features[start:start + chunk] @ text_features.t()
        own = text_image[None, :] == torch.arange(start, start + len(scores))[:, None]
        best_positive = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        image_rank[start:start + chunk] = (scores > best_positive).sum(dim=1)
    has_caption = torch.zeros(num_images, dtype=torch.bool)
    has_caption[text_image] = True
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = (image_rank[has_caption] < k).float().mean().item()
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
    return metrics


def clip_benchmark_names(metrics: dict) -> dict[str, float]:
    """The same numbers under CLIP_benchmark's keys (acc1, acc5, image/text_retrieval_recall@k), so results
    compare key for key with its JSON. acc5 is left out where top5 is (under 5 classes; CLIP_benchmark: NaN)."""
    aliases = {"top1": "acc1", "top5": "acc5"}
    names = {aliases[key]: value for key, value in metrics.items() if key in aliases}
    for key, value in metrics.items():  # CLIP_benchmark names the direction by what is retrieved
        if key.startswith("text_to_image_R@"):
            names["image_retrieval_recall@" + key.rsplit("@", 1)[1]] = value
        elif key.startswith("image_to_text_R@"):
            names["text_retrieval_recall@" + key.rsplit("@", 1)[1]] = value
    return names
