"""Periodic evaluation during training: named hooks that take the model and return metrics.

A hook is a callable ``hook(model) -> {"eval/<name>": value}``, run on the main process in
eval mode. Config entries are a registered name (``"synthetic_retrieval"``), or an evaluation
spec ``"zero_shot:cifar10=/data/cifar10,max_samples=2000"`` / ``"retrieval:flickr8k=captions.tsv"``
(also as a table: ``{task = "zero_shot", name = "cifar10", path = "/data/cifar10"}``). Spec
datasets are decoded and preprocessed once, when the run starts.
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


def _parse_entry(entry: object) -> object:
    """An EvalSpec for a spec entry, the name for a registered hook; ConfigError (one sentence) otherwise."""
    from clipforge.errors import ClipforgeError
    from clipforge.evaluation.runner import EvalSpec

    try:
        if isinstance(entry, dict):
            return EvalSpec.from_dict(entry)
        if isinstance(entry, str) and ":" in entry and entry.split(":", 1)[0] in ("zero_shot", "retrieval"):
            return EvalSpec.parse(*entry.split(":", 1))
        if isinstance(entry, str) and entry in _REGISTRY:
            return entry
    except ConfigError:
        raise
    except ClipforgeError as error:
        raise ConfigError(f"training config field 'eval' entry {str(entry)[:80]!r}: {error}") from None
    raise ConfigError(f"training config field 'eval' names unknown hook {str(entry)[:80]!r}; known hooks: "
                      f"{', '.join(sorted(_REGISTRY))}, or 'zero_shot:NAME=PATH' / 'retrieval:NAME=PATH'")


def check_eval_entries(entries: list) -> None:
    """Called by the config check, so a typo in eval is named before the model is built or data read."""
    for entry in entries:
        _parse_entry(entry)


def build_eval_hooks(entries: list, *, model: CLIP, device: torch.device, seed: int) -> list[EvalHook]:
    from clipforge.errors import ClipforgeError

    hooks = []
    for entry in entries:
        parsed = _parse_entry(entry)
        if isinstance(parsed, str):
            hooks.append(_REGISTRY[parsed](model=model, device=device, seed=seed))
            continue
        try:
            hooks.append(_spec_hook(parsed, model, device))
        except ConfigError:
            raise
        except ClipforgeError as error:
            raise ConfigError(f"training config field 'eval' entry {str(entry)[:80]!r}: {error}") from None
    return hooks


def _spec_hook(spec, model: CLIP, device: torch.device) -> EvalHook:
    """Zero-shot or retrieval on a dataset decoded once; each call embeds the cached pixels."""
    from clipforge.evaluation.datasets import load_classification, load_retrieval
    from clipforge.evaluation.metrics import classification_metrics, retrieval_metrics
    from clipforge.evaluation.zero_shot import get_templates, read_templates, zero_shot_scores
    from clipforge.transforms import image_transform

    if spec.name.lower().startswith("wds/"):
        raise ConfigError(f"training config field 'eval': WebDataset copies ('{spec.name[:40]}') are not evaluated "
                          "during training yet; evaluate checkpoints with clipforge eval instead")
    preprocess = image_transform(model.image_size)
    prefix = f"eval/{spec.task}_{spec.label}_"
    if spec.task == "zero_shot":
        dataset = load_classification(spec.name, spec.path, spec.split, classnames_file=spec.classnames,
                                      max_samples=spec.max_samples)
        templates = read_templates(spec.templates, spec.name) if spec.templates else get_templates(spec.name) \
            if _has_templates(spec.name) else ["{}"]
        labels = torch.as_tensor(dataset.labels)
    elif spec.task == "retrieval":
        dataset = load_retrieval(spec.name, spec.path, spec.split, image_root=spec.image_root,
                                 max_images=spec.max_samples)
        owners = torch.tensor([i for i, captions in enumerate(dataset.captions) for _ in captions])
        captions = [c for group in dataset.captions for c in group]
    else:
        raise ConfigError(f"training config field 'eval': task '{spec.task}' cannot run during training; "
                          "use zero_shot or retrieval")
    pixels = torch.stack([preprocess(dataset[i][0]) for i in range(len(dataset))])

    def embed_images(model: CLIP) -> torch.Tensor:
        return torch.cat([model.encode_image(pixels[i:i + 256].to(device), normalize=True).float().cpu()
                          for i in range(0, len(pixels), 256)])

    def hook(model: CLIP) -> dict[str, float]:
        from clipforge.evaluation.features import text_features

        if spec.task == "zero_shot":
            scores = zero_shot_scores(model, embed_images(model), dataset.classnames, templates)
            metrics = classification_metrics(scores, labels, len(dataset.classnames))
            return {prefix + k: metrics[k] for k in ("top1", "top5", "mean_per_class_recall") if k in metrics}
        metrics = retrieval_metrics(embed_images(model), text_features(model, captions), owners)
        return {prefix + k: v for k, v in metrics.items()}

    return torch.no_grad()(hook)


def _has_templates(name: str) -> bool:
    from clipforge.evaluation.datasets import dataset_templates

    return bool(dataset_templates(name))


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


@register_eval_hook("synthetic_zero_shot")
def synthetic_zero_shot(model: CLIP, device: torch.device, seed: int, count: int = 600) -> EvalHook:
    """Zero-shot colour-and-shape classification (28 classes, "red circle" ... "white star") of the
    held-out synthetic images that show a single shape, prompts "a small {}." and "a large {}.", for
    every objective (contrastive by cosine, the predictive ones by likelihood). Also reports the
    colour and shape read off the predicted class. Chance: 1/28, 1/7, 1/4."""
    from clipforge.data.synthetic import COLOURS, SHAPES, single_shape_labels, synthetic_pair
    from clipforge.evaluation.metrics import classification_metrics
    from clipforge.evaluation.zero_shot import zero_shot_scores
    from clipforge.transforms import image_transform

    classnames = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    templates = ["a small {}.", "a large {}."]
    labelled = single_shape_labels(seed, count)  # (eval index, "colour shape") of the one-shape images
    labels = torch.tensor([classnames.index(name) for _, name in labelled])
    preprocess = image_transform(model.image_size)
    size = max(64, model.image_size)
    pixels = torch.stack([preprocess(synthetic_pair(seed, index, size)[0]) for index, _ in labelled])

    def hook(model: CLIP) -> dict[str, float]:
        features = torch.cat([model.encode_image(pixels[i:i + 256].to(device), normalize=True).float().cpu()
                              for i in range(0, len(pixels), 256)])
        scores = zero_shot_scores(model, features, classnames, templates)
        metrics = classification_metrics(scores, labels, len(classnames))
        predicted = scores.argmax(dim=1)
        shapes = len(SHAPES)
        return {"eval/synthetic_zero_shot_top1": metrics["top1"],
                "eval/synthetic_zero_shot_colour": (predicted // shapes == labels // shapes).float().mean().item(),
                "eval/synthetic_zero_shot_shape": (predicted % shapes == labels % shapes).float().mean().item()}

    return torch.no_grad()(hook)
