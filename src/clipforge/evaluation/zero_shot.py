"""Zero-shot classifiers from class names and prompt templates, ensembled as in the paper.

Each class's text embeddings over all templates are L2-normalised, averaged and
renormalised; the classifier is the [embed_dim, classes] matrix of those means.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Sequence

import torch
import torch.nn.functional as F

from clipforge.errors import ClipforgeError
from clipforge.models.clip import CLIP
from clipforge.tokenizer import tokenize


@lru_cache(maxsize=None)
def _template_sets() -> dict[str, tuple[str, ...]]:
    data = json.loads((resources.files("clipforge.evaluation") / "templates.json").read_text(encoding="utf-8"))
    return {name: tuple(items) for name, items in data.items() if not name.startswith("_")}


def get_templates(name: str) -> list[str]:
    """A built-in template set: 'imagenet' (the paper's 80 prompts) or 'simple' (its 7-prompt subset)."""
    sets = _template_sets()
    if name not in sets:
        raise ClipforgeError(f"unknown template set '{name}'; choose one of {', '.join(sets)} or pass a file")
    return list(sets[name])


@torch.no_grad()
def build_zero_shot_classifier(model: CLIP, classnames: Sequence[str], templates: Sequence[str],
                               batch_size: int = 256) -> torch.Tensor:
    """[embed_dim, len(classnames)] matrix of ensembled, normalised class embeddings."""
    if not classnames:
        raise ClipforgeError("no class names given; pass at least one label")
    templates = list(templates) or ["{}"]
    for template in templates:
        if "{}" not in template:
            raise ClipforgeError(f"prompt template {template!r} has no '{{}}' where the class name goes")
    device = next(model.parameters()).device
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    features = torch.cat([
        model.encode_text(tokenize(prompts[i:i + batch_size], model.context_length, truncate=True).to(device),
                          normalize=True).float()
        for i in range(0, len(prompts), batch_size)
    ])
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).t()
