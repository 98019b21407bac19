"""Synthetic image-caption pairs that need no files: coloured shapes with compositional captions.

Every pair is a pure function of ``(seed, index)``, so a run is reproducible anywhere and a held-out
split is just other indices (``EVAL_OFFSET`` and up, which training never draws). Captions name each
shape's size, colour, kind, count and place ("a large red circle on the left and two small blue
squares at the bottom"); all of it is visible in the pixels, so a small CLIP learns to retrieve the
right caption far above chance within minutes.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "EVAL_OFFSET", "SHAPES", "SyntheticCaptions", "eval_pairs", "single_shape_labels",
           "synthetic_pair"]

EVAL_OFFSET = 10**9  # eval indices start here; training uses 0 .. num_samples-1
BASE_SIZE = 64
COLOURS = {"red": (215, 35, 35), "green": (40, 175, 60), "blue": (45, 80, 230), "yellow": (240, 220, 40),
           "purple": (145, 55, 200), "orange": (245, 135, 25), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.09, "large": 0.17}  # circumradius as a fraction of the canvas side
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
          "center": (0.5, 0.5)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
NUMBERS = {2: "two", 3: "three"}
BACKGROUNDS = ((0, 0, 0), (35, 35, 35), (70, 70, 70), (100, 100, 100))  # neutral: never a named colour
OPPOSITE = (("left", "right"), ("top", "bottom"))
ADJACENT = (("left", "top"), ("left", "bottom"), ("right", "top"), ("right", "bottom"))


def _layout(rng: random.Random) -> list[dict]:
    """Groups of identical shapes: one group (1-3 shapes) or two groups (2-3 shapes in all)."""
    def group(place: str, count: int = 1, size: str | None = None) -> dict:
        return {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "place": place, "count": count,
                "size": size or rng.choice(list(SIZES))}

    kind = rng.random()
    if kind < 0.4:
        return [group(rng.choice(list(PLACES)))]
    if kind < 0.6:  # several of one kind: small, so they fit side by side
        return [group(rng.choice(list(PLACES)), rng.choice((2, 3)), "small")]
    if kind < 0.8:
        first, second = rng.choice(ADJACENT)
        groups = [group(first), group(second)]
    else:
        first, second = rng.choice(OPPOSITE)
        groups = [group(first), group(second)]
        if rng.random() < 0.4:
            groups[rng.randrange(2)].update(count=2, size="small")
    rng.shuffle(groups)
    return groups


def _points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii = 4, (r,)
        angle += math.pi / 4
    elif shape == "triangle":
        corners, radii = 3, (r,)
        angle -= math.pi / 2  # point up
    else:  # star: five points, inner radius 0.45 r
        corners, radii = 10, (r, 0.45 * r)
        angle -= math.pi / 2
    return [(cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / corners),
             cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]


def _jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random, size: int) -> Image.Image:
    base = rng.choice(BACKGROUNDS)
    if rng.random() < 0.5:
        return Image.new("RGB", (size, size), base)
    noise = np.random.default_rng(rng.getrandbits(63)).normal(0, 18, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + 20 + noise, 0, 255).astype(np.uint8))


def _describe(group: dict) -> str:
    name = f"{group['size']} {group['colour']} {group['shape']}"
    words = f"a {name}" if group["count"] == 1 else f"{NUMBERS[group['count']]} {name}s"
    return f"{words} {PHRASES[group['place']]}"


def synthetic_pair(seed: int, index: int, size: int = BASE_SIZE) -> tuple[Image.Image, str]:
    """The RGB image (``size`` x ``size``) and caption of pair ``index``; same inputs, same pair."""
    rng = random.Random(f"clipforge-synthetic:{seed}:{index}")
    groups = _layout(rng)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for group in groups:
        px, py = PLACES[group["place"]]
        horizontal = group["place"] in ("top", "bottom", "center")
        spacing = 0.22
        for k in range(group["count"]):
            offset = (k - (group["count"] - 1) / 2) * spacing
            cx = (px + (offset if horizontal else 0) + rng.uniform(-0.03, 0.03)) * size
            cy = (py + (0 if horizontal else offset) + rng.uniform(-0.03, 0.03)) * size
            r = SIZES[group["size"]] * rng.uniform(0.9, 1.1) * size
            colour = _jitter_colour(rng, COLOURS[group["colour"]], 15)
            if group["shape"] == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.polygon(_points(group["shape"], cx, cy, r, rng.uniform(-0.25, 0.25)), fill=colour)
    return image, " and ".join(_describe(g) for g in groups)


def single_shape_labels(seed: int, count: int) -> list[tuple[int, str]]:
    """(pair index, "colour shape") for the held-out pairs among the first ``count`` that show exactly one
    shape: the zero-shot classification set of ``synthetic_zero_shot`` (the layout is the first thing
    ``synthetic_pair`` draws, so it is read without rendering)."""
    out = []
    for index in range(EVAL_OFFSET, EVAL_OFFSET + count):
        groups = _layout(random.Random(f"clipforge-synthetic:{seed}:{index}"))
        if len(groups) == 1 and groups[0]["count"] == 1:
            out.append((index, f"{groups[0]['colour']} {groups[0]['shape']}"))
    return out


def eval_pairs(seed: int, count: int, size: int = BASE_SIZE) -> tuple[list[Image.Image], list[str]]:
    """``count`` held-out pairs (indices from ``EVAL_OFFSET``), never seen in training."""
    pairs = [synthetic_pair(seed, EVAL_OFFSET + i, size) for i in range(count)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


class SyntheticCaptions:
    """A map-style source of ``num_samples`` pairs; ``split="eval"`` gives the disjoint held-out ones."""

    def __init__(self, seed: int = 0, num_samples: int = 10_000, size: int = BASE_SIZE, split: str = "train") -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if split == "train" and num_samples > EVAL_OFFSET:
            raise ValueError(f"num_samples must be <= {EVAL_OFFSET} so training never reaches the eval split")
        self.seed, self.num_samples, self.size = seed, num_samples, size
        self.offset = EVAL_OFFSET if split == "eval" else 0
        self.problems: dict[int, str] = {}  # generated pairs are never bad

    def __len__(self) -> int:
        return self.num_samples

    def name(self, index: int) -> tuple[str, str]:
        return f"synthetic:{self.seed}:{self.offset + index}", ""

    def load(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        return synthetic_pair(self.seed, self.offset + index, self.size)

    __getitem__ = load
