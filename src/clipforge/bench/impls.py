"""The three implementations with identical weights: clipforge, open_clip and Hugging Face.

clipforge builds a randomly initialised model (OpenAI's init), writes it in open_clip's and
Hugging Face's own formats and each package loads it with its own loader, so every implementation
computes the same function and their outputs can be compared directly.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import clipforge
from clipforge.models import CLIP


@dataclass
class Implementations:
    clipforge: CLIP
    open_clip: Any | None
    open_clip_tokenizer: Any | None
    hf: Any | None
    hf_tokenizer: Any | None
    notes: list[str]


def _quiet() -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def build(name: str, device: torch.device, seed: int = 0, hf: bool = True) -> Implementations:
    """clipforge's model ``name`` with seeded random weights, and the same weights in open_clip and HF."""
    torch.manual_seed(seed)
    model = clipforge.create_model(name).to(device).eval()
    notes: list[str] = []
    oc = oc_tok = hf_model = hf_tok = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import open_clip

            clipforge.save(model, Path(tmp) / "oc", format="open_clip")
            with _quiet():
                oc = open_clip.create_model(f"local-dir:{Path(tmp) / 'oc'}", device=device).eval()
                oc_tok = open_clip.get_tokenizer(f"local-dir:{Path(tmp) / 'oc'}")
        except ImportError as error:
            notes.append(f"open_clip not installed ({error})")
        if hf and not model.config.vision.is_resnet:
            try:
                import transformers

                transformers.utils.logging.set_verbosity_error()
                transformers.utils.logging.disable_progress_bar()
                clipforge.save(model, Path(tmp) / "hf", format="hf")
                with _quiet():
                    hf_model = transformers.CLIPModel.from_pretrained(
                        Path(tmp) / "hf", attn_implementation="sdpa").to(device).eval()
                    hf_tok = transformers.AutoTokenizer.from_pretrained(Path(tmp) / "hf")
            except ImportError as error:
                notes.append(f"transformers not installed ({error})")
        elif hf:
            notes.append("Hugging Face CLIPModel has no ResNet tower")
    return Implementations(model, oc, oc_tok, hf_model, hf_tok, notes)


def hf_features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst row's cosine similarity, computed in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double().cpu(), b.double().cpu(), dim=-1).min())
