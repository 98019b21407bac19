"""JPEG decode + preprocessing throughput on Flickr8k files, one process, one image at a time.

Every implementation starts from the file path and ends at the normalised [3, S, S] float tensor:
clipforge's exact transform (bit-identical to OpenAI's), clipforge's opt-in ``DraftImageTransform``,
OpenAI's ``preprocess``, open_clip's eval transform and Hugging Face's ``CLIPImageProcessor``
(torchvision backend; and the PIL backend). Agreement: mean |difference| from clipforge's exact
output in 0-255 levels (normalised difference x std x 255).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from clipforge.bench.common import Row, interleaved, median
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD
from clipforge.transforms.image import DraftImageTransform, ImageTransform

Pipeline = Callable[[Path], torch.Tensor]


def _pipelines(size: int) -> dict[str, Pipeline]:
    exact, draft = ImageTransform(size), DraftImageTransform(size)
    out: dict[str, Pipeline] = {"clipforge": exact, "clipforge draft (opt-in)": draft}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import clip.clip as openai_clip

            openai = openai_clip._transform(size)
            out["OpenAI preprocess"] = lambda path: openai(Image.open(path))
        except ImportError:
            pass
        try:
            import open_clip

            oc = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
            out["open_clip"] = lambda path: oc(Image.open(path))
        except ImportError:
            pass
        try:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            settings = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
            classes = {"HF CLIPImageProcessor": getattr(transformers, "CLIPImageProcessor", None),
                       "HF CLIPImageProcessorPil": getattr(transformers, "CLIPImageProcessorPil", None)}
            for name, cls in classes.items():
                if cls is not None:
                    processor = cls(**settings)
                    out[name] = lambda path, p=processor: p(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
        except ImportError:
            pass
    return out


def decode_rows(paths: list[Path], sizes: list[int], reps: int, warmup: int) -> list[Row]:
    """Images/s of path -> tensor for each pipeline and size, with the pixel difference from the exact one."""
    rows = []
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    for size in sizes:
        pipelines = _pipelines(size)
        exact = torch.stack([pipelines["clipforge"](p) for p in paths])
        diffs = {}
        for name, pipeline in pipelines.items():
            out = torch.stack([pipeline(p) for p in paths]).float()
            diffs[name] = float(((out - exact).abs() * std * 255).mean())
        fns = {name: (lambda pl=pipeline: [pl(p) for p in paths]) for name, pipeline in pipelines.items()}
        times = interleaved(fns, reps, warmup, torch.device("cpu"))
        for name in pipelines:
            rows.append(Row(section="decode", model=f"{size} px from {len(paths)} Flickr8k JPEGs (128x128)",
                            precision="-", impl=name, value=len(paths) / median(times[name]), unit="images/s",
                            seconds=times[name], agree_ref=diffs[name],
                            note="agreement = mean |difference| from clipforge's exact output, 0-255 levels"))
    return rows
