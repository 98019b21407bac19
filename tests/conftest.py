"""Shared helpers: paths to ../shared/data, tiny reference models, and a relative-error check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FLICKR_CAPTIONS = SHARED_DATA / "flickr8k" / "captions.tsv"
TOLERANCE = 1e-5  # relative error allowed between clipforge and a reference, in float32

# Tiny architectures that exercise every code path of the released ones in milliseconds.
# Widths are multiples of 64 because OpenAI's loader derives head counts as width // 64.
TINY_VIT = {"embed_dim": 48, "quick_gelu": True,
            "vision": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "heads": 2},
            "text": {"context_length": 77, "vocab_size": 49408, "width": 128, "layers": 2, "heads": 2}}
TINY_RESNET = {"embed_dim": 48, "quick_gelu": True,
               "vision": {"type": "resnet", "image_size": 64, "layers": [1, 2, 1, 1], "width": 32, "heads": 16},
               "text": {"context_length": 77, "vocab_size": 49408, "width": 128, "layers": 2, "heads": 2}}

CAPTIONS = ["a dog runs on the grass .", "Two children play soccer in a park", "", "A&amp;B café — 12 cats!",
            "a " * 30 + "long caption"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = relative_error(actual, expected)
    assert error < tolerance, f"relative error {error:.3g} >= {tolerance}"


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight and BatchNorm statistic so no parameter sits at a trivial init value."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or name.endswith(("logit_scale", "attn_mask")):
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        else:
            tensor.add_(0.02 * noise)
    return model


def images_for(size: int, count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def captions() -> list[str]:
    return list(CAPTIONS)


def flickr_captions(limit: int | None = None) -> list[str]:
    if not FLICKR_CAPTIONS.is_file():
        pytest.skip(f"Flickr8k captions not found at {FLICKR_CAPTIONS}; the shared data folder is absent")
    lines = FLICKR_CAPTIONS.read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[1] for line in lines]
    return texts[:limit] if limit else texts
