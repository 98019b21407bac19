"""Periodic evaluation during training: named hooks that take the model and return metrics.

A hook is a callable ``hook(model) -> {"eval/<name>": value}``, run on the main process in
eval mode. The evaluation package registers zero-shot and retrieval hooks; the built-in
``synthetic_retrieval`` measures held-out retrieval on the synthetic source.
"""

from __future__ import annotations

from typing import Callable

import torch

from clipforge.errors import ConfigError
from clipforge.models.clip import CLIP

EvalHook = Callable[[CLIP], dict[str, float]]
_REGISTRY: dict[str, Callable[..., EvalHook]] = {}


def register_eval_hook(name: str) -> Callable[[Callable[..., EvalHook]], Callable[..., EvalHook]]:
    def decorator(factory: Callable[..., EvalHook]) -> Callable[..., EvalHook]:
        _REGISTRY[name] = factory
        return factory
    return decorator


def build_eval_hooks(names: list[str], *, model: CLIP, device: torch.device, seed: int) -> list[EvalHook]:
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ConfigError(f"training config field 'eval' names unknown hook '{unknown[0]}'; "
                          f"known hooks: {', '.join(sorted(_REGISTRY))}")
    return [_REGISTRY[name](model=model, device=device, seed=seed) for name in names]


@torch.no_grad()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k for paired rows (row i matches row i)."""
    similarity = image_features @ text_features.t()
    target = torch.arange(len(similarity), device=similarity.device)
    metrics = {}
    for name, scores in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        ranks = (scores > scores[target, target][:, None]).sum(dim=1)  # how many beat the true pair
        for k in ks:
            metrics[f"{name}_R@{k}"] = (ranks < k).float().mean().item()
    return metrics


@register_eval_hook("synthetic_retrieval")
def synthetic_retrieval(model: CLIP, device: torch.device, seed: int, count: int = 256) -> EvalHook:
    """Recall on held-out synthetic pairs (indices the training split never draws)."""
    from clipforge.data.synthetic import eval_pairs
    from clipforge.tokenizer import tokenize
    from clipforge.transforms import image_transform

    images, captions = eval_pairs(seed, count, size=max(64, model.image_size))  # as training renders
    preprocess = image_transform(model.image_size)
    pixels = torch.stack([preprocess(image) for image in images])
    tokens = tokenize(captions, context_length=model.context_length, truncate=True)

    def hook(model: CLIP) -> dict[str, float]:
        image_features = model.encode_image(pixels.to(device), normalize=True).float()
        text_features = model.encode_text(tokens.to(device), normalize=True).float()
        return {f"eval/synthetic_{k}": v for k, v in retrieval_recall(image_features, text_features).items()}

    return torch.no_grad()(hook)
