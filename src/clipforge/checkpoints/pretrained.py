"""open_clip's pretrained names ("ViT-B-32", "laion2b_s34b_b79k") as data, and their download.

The registry is ``pretrained_tags.json``, written from open_clip's own by
``scripts/import_open_clip_pretrained.py`` so that clipforge never imports open_clip.

Which source is fetched: OpenAI's URL for the ``openai`` tags (its path carries the full
SHA-256), else the Hugging Face Hub repo (as open_clip prefers), else the record's URL.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from clipforge.checkpoints.download import download_checked, download_verified
from clipforge.errors import DownloadError, UnknownModelError

DATA_NAME = "pretrained_tags.json"
# open_clip's default weights files of a Hub repo: safetensors first, as open_clip does
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_OPENAI_URL = re.compile(r"/[0-9a-f]{64}/[^/]+$")
_NAME_SHA_PREFIX = re.compile(r"-([0-9a-f]{8,64})$")  # open_clip release files: ...-d867053b.pt


class PretrainedName(NamedTuple):
    """One row of the registry: what a user types, and where the weights come from."""

    architecture: str
    tag: str
    source: str  # "hf-hub:ORG/REPO" or a URL


@dataclass(frozen=True)
class PretrainedWeights:
    """Everything open_clip records about one pretrained checkpoint of a plain-CLIP architecture."""

    architecture: str
    tag: str
    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str | None = None  # None: open_clip's default file names
    quick_gelu: bool = False
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int | None = None
    size: int | tuple[int, int] | None = None

    @property
    def base_architecture(self) -> str:
        """The config name without open_clip's '-quickgelu' suffix (the activation is `quick_gelu`)."""
        return self.architecture.removesuffix("-quickgelu")

    @property
    def source(self) -> str:
        """What fetch_pretrained downloads: OpenAI's SHA-256 URL, else the Hub repo, else the URL."""
        if self.url and _OPENAI_URL.search(self.url):
            return self.url
        if self.hf_hub_id:
            return f"hf-hub:{self.hf_hub_id}"
        if self.url:
            return self.url
        raise DownloadError(f"{self.architecture}/{self.tag} has neither a URL nor a Hub repo; "
                            "regenerate pretrained_tags.json with scripts/import_open_clip_pretrained.py")

    @property
    def name(self) -> PretrainedName:
        return PretrainedName(self.architecture, self.tag, self.source)

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip-style preprocessing for these weights (image size comes from the model unless recorded)."""
        cfg: dict[str, Any] = {"mean": self.mean, "std": self.std, "interpolation": self.interpolation,
                               "resize_mode": self.resize_mode,
                               "fill_color": 0 if self.fill_color is None else self.fill_color}
        if self.size is not None:
            cfg["size"] = self.size
        return cfg


def _from_record(record: dict[str, Any]) -> PretrainedWeights:
    fields = dict(record)
    for key in ("mean", "std", "size"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    return PretrainedWeights(**fields)


@lru_cache(maxsize=None)
def _registry() -> dict[str, dict[str, PretrainedWeights]]:
    """{architecture: {tag: weights}} in the JSON's order."""
    text = (resources.files("clipforge.checkpoints") / DATA_NAME).read_text(encoding="utf-8")
    registry: dict[str, dict[str, PretrainedWeights]] = {}
    for record in json.loads(text)["pretrained"]:
        weights = _from_record(record)
        registry.setdefault(weights.architecture, {})[weights.tag] = weights
    return registry


def _clean_tag(tag: str) -> str:
    """open_clip's tag normalisation: case-insensitive, '-' and '_' alike."""
    return tag.strip().lower().replace("-", "_")


def _canonical_architecture(name: str) -> str | None:
    """Our name for an architecture: OpenAI spellings ('ViT-B/32', 'ViT-L/14@336px') and any case."""
    registry = _registry()
    text = name.strip()
    candidates = [text, re.sub(r"(?:@|-)(\d+)px$", r"-\1", text.replace("/", "-"))]
    for candidate in candidates:
        if candidate in registry:
            return candidate
    lowered = {arch.lower(): arch for arch in registry}
    return next((lowered[c.lower()] for c in candidates if c.lower() in lowered), None)


def list_pretrained(architecture: str | None = None) -> list[PretrainedName]:
    """Every (architecture, tag, source), or those of one architecture ([] if it has none)."""
    registry = _registry()
    if architecture is None:
        return [w.name for tags in registry.values() for w in tags.values()]
    canonical = _canonical_architecture(architecture)
    return [w.name for w in registry[canonical].values()] if canonical else []


def list_pretrained_tags(architecture: str) -> list[str]:
    """The pretrained tags of an architecture ([] if it has none)."""
    return [name.tag for name in list_pretrained(architecture)]


def get_pretrained(architecture: str, tag: str) -> PretrainedWeights:
    """The record for (architecture, tag); tags are case-insensitive and OpenAI spellings of names work."""
    registry = _registry()
    canonical = _canonical_architecture(architecture)
    if canonical is None:
        close = difflib.get_close_matches(architecture.replace("/", "-"), list(registry), n=3, cutoff=0.6)
        hint = f"close names with weights are {', '.join(close)}" if close else "no close name has any"
        raise UnknownModelError(
            f"architecture '{architecture}' has no pretrained weights in open_clip's registry ({hint}); "
            "run `clipforge models --pretrained` for every architecture and tag, or pass a checkpoint path"
        )
    weights = registry[canonical].get(_clean_tag(tag))
    if weights is None:
        close = difflib.get_close_matches(_clean_tag(tag), list(registry[canonical]), n=2, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UnknownModelError(
            f"'{tag}' is not a pretrained tag of {canonical}{hint}; its tags are "
            f"{', '.join(registry[canonical])}, so use one of those or pass the path of a checkpoint file"
        )
    return weights


def split_pretrained_name(text: str) -> tuple[str, str] | None:
    """('ViT-B-32', 'laion2b_s34b_b79k') for 'ViT-B-32/laion2b_s34b_b79k'; None for anything else.

    Only a known tag of a known architecture counts, so OpenAI's 'ViT-B/32' stays an architecture
    name; a caller should still prefer an existing local path of the same spelling.
    """
    architecture, slash, tag = str(text).rpartition("/")
    if not slash or not architecture or not tag:
        return None
    canonical = _canonical_architecture(architecture)
    if canonical is None or _clean_tag(tag) not in _registry()[canonical]:
        return None
    return canonical, _clean_tag(tag)


def url_sha256(url: str) -> str | None:
    """The SHA-256 a URL promises: OpenAI's full digest, open_clip's file-name prefix, or None."""
    if _OPENAI_URL.search(url):
        return url.rstrip("/").split("/")[-2]
    stem = url.rstrip("/").split("/")[-1].rsplit(".", 1)[0]
    match = _NAME_SHA_PREFIX.search(stem)
    return match.group(1) if match else None


def fetch_pretrained(weights: PretrainedWeights, cache_dir: str | Path | None = None, progress: bool = True,
                     *, prefer_url: bool = False) -> Path:
    """Local file of the weights, downloaded once into the cache and hash-checked where a hash is known.

    prefer_url: take the record's URL even when a Hub repo is known (for networks that block the Hub).
    """
    what = f"{weights.architecture}/{weights.tag} weights"
    source = weights.url if prefer_url and weights.url else weights.source
    if not source.startswith("hf-hub:"):
        if _OPENAI_URL.search(source):
            return download_verified(source, cache_dir, progress)
        return download_checked(source, url_sha256(source), cache_dir, progress, what=what)
    return _fetch_from_hub(weights, cache_dir, what)


def _hub_candidates(filename: str | None) -> list[str]:
    """open_clip's order: a safetensors twin of the file first, then the file itself."""
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _fetch_from_hub(weights: PretrainedWeights, cache_dir: str | Path | None, what: str) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise DownloadError(f"{what} live on the Hugging Face Hub but huggingface_hub is not installed; "
                            "run `pip install huggingface_hub`") from None
    repo = f"hf-hub:{weights.hf_hub_id}"
    candidates = _hub_candidates(weights.hf_filename)
    for filename in candidates:
        try:
            return Path(huggingface_hub.hf_hub_download(weights.hf_hub_id, filename, cache_dir=cache_dir))
        except LocalEntryNotFoundError:
            raise DownloadError(
                f"cannot reach the Hugging Face Hub for {what} ({repo}) and they are not cached; check the "
                "network connection (and HF_HUB_OFFLINE), or download the file and pass its local path instead"
            ) from None
        except EntryNotFoundError:
            continue  # the repo has no such file: try the next name, as open_clip does
        except (HfHubHTTPError, ValueError, OSError) as error:
            raise DownloadError(
                f"cannot fetch {what} from {repo} ({type(error).__name__}); check the network connection and "
                "your access to the repository, or download the file and pass its local path instead"
            ) from None
    raise DownloadError(f"{repo} has none of the files {', '.join(candidates)} for {what}; "
                        "download the weights yourself and pass their local path instead")
