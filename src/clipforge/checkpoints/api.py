"""``load`` and ``save``: one entry point for every CLIP checkpoint format.

Sources ``load`` understands, detected from the files themselves:
  - a released name ("ViT-B-32", "RN50", OpenAI spellings too): OpenAI's archive, downloaded once;
  - "hf-hub:ORG/REPO": fetched with huggingface_hub, then read as a folder;
  - a folder: open_clip hub layout (open_clip_config.json), Hugging Face CLIPModel (config.json),
    or clipforge (model.safetensors with clipforge metadata);
  - a file: clipforge .safetensors, OpenAI TorchScript archive or state dict, open_clip training
    checkpoint ("state_dict" with "module." prefixes), or a clipforge training checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from clipforge.checkpoints import hf, open_clip_format
from clipforge.checkpoints.atomic import atomic_write, staged_folder
from clipforge.checkpoints.download import RELEASED, download_verified
from clipforge.checkpoints.files import check_hub_id, first_line, read_json_object, shard_files, short
from clipforge.checkpoints.infer import infer_config, openai_config
from clipforge.checkpoints.pretrained import fetch_pretrained, get_pretrained, list_pretrained_tags, split_pretrained_name
from clipforge.checkpoints.resize import resize_position_tables
from clipforge.checkpoints.weights import (NON_WEIGHT_KEYS, load_state_dict_into, read_folder_weights,
                                           read_weights_file, unwrap_state_dict)
from clipforge.errors import CheckpointError, ClipforgeError, ConfigError, DownloadError, UnknownModelError
from clipforge.models.clip import CLIP
from clipforge.models.config import ModelConfig, config_from_dict
from clipforge.models.factory import ALIASES, available_models, resolve_config, with_overrides
from clipforge.tokenizer import get_tokenizer
from clipforge.tokenizer.hf_files import save_hf_tokenizer_files
from clipforge.transforms import image_transform

CLIPFORGE_FORMAT = "clipforge"
CLIPFORGE_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
Format = Literal["clipforge", "open_clip", "hf"]


# OpenAI's spellings of its released models (clip.load("ViT-B/32")).
OPENAI_SPELLINGS = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                    "ViT-L/14@336px": "ViT-L-14-336", "ViT-L-14-336px": "ViT-L-14-336"}


def released_models() -> list[str]:
    """Names that load() downloads from OpenAI."""
    return list(RELEASED)


def _resolve(source: str | Path, cache_dir: str | Path | None) -> tuple[Path, str, bool]:
    """(local path, model name, whether it is one of OpenAI's released files)."""
    text = str(source)
    if text.startswith("hf-hub:"):
        return _from_hub(text[len("hf-hub:"):], cache_dir), text, False
    path = Path(text).expanduser()
    if path.exists():
        return path, path.stem, False
    name = OPENAI_SPELLINGS.get(text, text)
    if name in RELEASED:
        return download_verified(RELEASED[name], cache_dir), name, True
    if ALIASES.get(text, text) in available_models():
        tags = list_pretrained_tags(ALIASES.get(text, text))
        hint = (f"load('{text}', pretrained=TAG) with TAG one of {', '.join(tags)}, or " if tags else "")
        raise UnknownModelError(f"'{text}' is an architecture name, not a checkpoint; {hint}"
                                f"clipforge.create_model('{text}') for a randomly initialised model")
    raise UnknownModelError(
        f"'{text}' is neither an existing file or folder nor a released model; released models are "
        f"{', '.join(RELEASED)}; hub models are written 'hf-hub:ORG/REPO'"
    )


def _from_hub(repo_id: str, cache_dir: str | Path | None) -> Path:
    """Fetch configs first, then only the one weights file the format needs (never .bin and .safetensors both)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    check_hub_id(repo_id)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir,
                                                        allow_patterns=["*.json", "*.txt"]))
        if (folder / open_clip_format.CONFIG_NAME).is_file():
            candidates = [open_clip_format.SAFE_WEIGHTS_NAME, open_clip_format.WEIGHTS_NAME]
        else:
            candidates = ["model.safetensors", "pytorch_model.bin"]
        for name in candidates:
            index = folder / f"{name}.index.json"
            files = shard_files(index) if index.is_file() else [name]
            try:
                for file in files:
                    huggingface_hub.hf_hub_download(repo_id, file, cache_dir=cache_dir)
                return folder
            except EntryNotFoundError:
                continue
    except LocalEntryNotFoundError:
        raise DownloadError(f"cannot reach the Hugging Face Hub for 'hf-hub:{repo_id}' and it is not cached; "
                            "check the network connection or pass a local folder") from None
    except (HfHubHTTPError, ValueError, OSError) as error:
        raise DownloadError(f"cannot fetch 'hf-hub:{repo_id}' ({type(error).__name__}); check the repository "
                            "name and your access to it") from None
    raise CheckpointError(f"'hf-hub:{repo_id}' has none of the weight files {', '.join(candidates)}")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or one sentence naming the file (files.read_json_object)."""
    return read_json_object(path)


def _read_folder_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The first of names in folder, whole or sharded, each shard checked (weights.read_folder_weights)."""
    return read_folder_weights(folder, names)


def _clipforge_config(metadata: dict[str, str], path: Path, name: str) -> ModelConfig:
    """The model config a clipforge .safetensors stores in its metadata, or one sentence naming the file."""
    fix = "save it again with clipforge.save, or pass model= to load it as plain weights"
    text = metadata.get("config")
    if not isinstance(text, str):
        raise CheckpointError(f"'{path}' is marked as a clipforge checkpoint but stores no model config; {fix}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"'{path}' stores a model config that is not valid JSON; {fix}") from None
    try:
        return config_from_dict(data, name)
    except ConfigError as error:
        raise CheckpointError(f"'{path}' stores an invalid model config ({first_line(error, 110)}); {fix}") from None


def _open_clip_folder(path: Path, name: str) -> tuple[ModelConfig, dict]:
    config = open_clip_format.read_open_clip_config(path / open_clip_format.CONFIG_NAME, name)
    state = _read_folder_weights(path, (open_clip_format.SAFE_WEIGHTS_NAME, open_clip_format.WEIGHTS_NAME))
    text = config.text
    if text is not None and text.hf_tokenizer_name and any(
            (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        config = config.replace(text={"hf_tokenizer_name": str(path)}, name=name)  # the folder ships the tokenizer
    return config, state


def _plain_state_config(state: dict, path: Path, name: str, quick_gelu: bool | None, model: Any,
                        torchscript: bool) -> ModelConfig:
    """The architecture of weights that carry no config: the caller's, OpenAI's rule, or inferred without doubt."""
    if hf.is_hf_state_dict(state):
        raise CheckpointError(f"'{path}' holds Hugging Face weights without their config; pass the folder "
                              "that contains config.json")
    if model == "openai" or (model is None and torchscript):
        return openai_config(state, name)
    if model is not None:
        return resolve_config(model)
    return infer_config(state, quick_gelu=quick_gelu, name=name, source=f"'{path}'")


def _read_source(path: Path, name: str, quick_gelu: bool | None, model: Any = None) -> tuple[ModelConfig, dict]:
    """(config, OpenAI-layout state dict) for a local file or folder."""
    if path.is_dir():
        if (path / open_clip_format.CONFIG_NAME).is_file():
            config, state = _open_clip_folder(path, name)
        elif (path / HF_CONFIG_NAME).is_file():
            config, state = hf.read_hf_folder(path, name)
        elif (path / CLIPFORGE_WEIGHTS_NAME).is_file():
            return _read_source(path / CLIPFORGE_WEIGHTS_NAME, name, quick_gelu, model)
        else:
            raise CheckpointError(f"folder '{path}' is not a CLIP checkpoint: it has no open_clip_config.json, "
                                  f"config.json or {CLIPFORGE_WEIGHTS_NAME}")
        if model is not None:
            config = resolve_config(model)
    else:
        content, metadata = read_weights_file(path)
        if metadata.get("format") == CLIPFORGE_FORMAT:
            config = resolve_config(model) if model is not None else _clipforge_config(metadata, path, name)
            state = content
        elif isinstance(content, dict) and isinstance(content.get("config"), dict):  # clipforge training checkpoint
            config = resolve_config(model) if model is not None else config_from_dict(content["config"], name)
            state = unwrap_state_dict(content, path)
        else:
            state = open_clip_format.from_custom_text_layout(unwrap_state_dict(content, path))
            torchscript = any(key in state for key in NON_WEIGHT_KEYS)
            config = _plain_state_config(state, path, name, quick_gelu, model, torchscript)
    return config, open_clip_format.from_custom_text_layout(state)


def _fit_scalar_logit_scale(state: dict) -> dict:
    scale = state.get("logit_scale")
    if scale is not None and scale.dim() == 1 and scale.numel() == 1:  # open_clip's nonscalar_logit_scale
        state = {**state, "logit_scale": scale.reshape(())}
    return state


def _pretrained_source(source: str, pretrained: str | None, cache_dir) -> tuple[Path, ModelConfig] | None:
    """For open_clip names ("ViT-B-32" + pretrained="laion2b_s34b_b79k", or "ViT-B-32/laion2b_s34b_b79k"):
    the downloaded weights and the config with the tag's activation and preprocessing."""
    if pretrained is None:
        split = split_pretrained_name(source)
        if split is None:
            return None
        source, pretrained = split
    if Path(str(pretrained)).expanduser().is_file():  # open_clip also takes pretrained=<file>
        return Path(str(pretrained)).expanduser(), resolve_config(source)
    weights = get_pretrained(source, pretrained)
    path = fetch_pretrained(weights, cache_dir)
    config = resolve_config(weights.architecture)
    preprocess = {key: value for key, value in weights.preprocess_cfg().items()
                  if key in ("mean", "std", "interpolation", "resize_mode", "fill_color")}
    config = config.replace(quick_gelu=weights.quick_gelu, preprocess=preprocess,
                            name=f"{weights.architecture}/{weights.tag}")
    return path, config


def load(source: str | Path, device: str | torch.device = "cpu", jit: bool = False,
         download_root: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
         quick_gelu: bool | None = None, cache_dir: str | Path | None = None, model: Any = None,
         pretrained: str | None = None, image_size: int | None = None, context_length: int | None = None,
         ) -> tuple[CLIP, Callable[[Any], torch.Tensor] | None]:
    """A CLIP model in eval mode and its preprocessing transform, from any supported source.

    The first four parameters are those of OpenAI's ``clip.load`` (``download_root`` is an alias
    of ``cache_dir``). ``pretrained``: an open_clip tag for the architecture named by ``source``
    (``load("ViT-B-32", pretrained="laion2b_s34b_b79k")``; ``"ViT-B-32/laion2b_s34b_b79k"`` too).
    ``model``: the architecture of weights that do not record it (a name, config dict or JSON file,
    or "openai" for OpenAI's rule). ``quick_gelu`` sets the activation where the source does not
    record it (plain state dicts) and overrides it elsewhere. ``image_size`` / ``context_length``
    resize the position tables as open_clip does. A text-only model comes with no transform (None).
    """
    if jit:
        raise ClipforgeError("clipforge does not run TorchScript graphs; call load(..., jit=False) (the default) "
                             "to get the same model as a regular module")
    cache = cache_dir if cache_dir is not None else download_root
    resolved = _pretrained_source(str(source), pretrained, cache) if not str(source).startswith("hf-hub:") else None
    if resolved is not None:
        path, config = resolved
        config_from_tag = config if model is None else resolve_config(model)
        content, _ = read_weights_file(path)
        state = open_clip_format.from_custom_text_layout(unwrap_state_dict(content, path))
        config = config_from_tag
    elif pretrained is not None:
        raise UnknownModelError(f"pretrained={pretrained!r} applies to an architecture name such as 'ViT-B-32', "
                                f"not to '{source}'; load that source without pretrained=")
    else:
        path, name, openai_release = _resolve(source, cache)
        config, state = _read_source(path, name, quick_gelu, "openai" if openai_release and model is None else model)
    config = with_overrides(config, quick_gelu=quick_gelu, image_size=image_size, context_length=context_length)
    state = resize_position_tables(_fit_scalar_logit_scale(state), config)
    clip = CLIP(config)
    load_state_dict_into(clip, state, str(source))
    clip = clip.to(device=device, dtype=dtype).eval()
    return clip, model_transform(config)


def model_transform(config: ModelConfig) -> Callable[[Any], torch.Tensor] | None:
    """The eval preprocessing a checkpoint was made for (None for a text-only model)."""
    if config.vision is None:
        return None
    pre = config.preprocess
    return image_transform(config.vision.image_size, mean=pre.mean, std=pre.std, interpolation=pre.interpolation,
                           resize_mode=pre.resize_mode, fill_color=pre.fill_color)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def _write_safetensors(state: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(_tensors(state), str(file), metadata=metadata)


def _write_json(data: dict[str, Any], file: Path) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# What load() reads first in a folder: a config there would shadow weights saved in a later format.
_FOLDER_PRIORITY = (open_clip_format.CONFIG_NAME, HF_CONFIG_NAME, CLIPFORGE_WEIGHTS_NAME)


def _refuse_shadowed(folder: Path, written: str) -> None:
    """Refuse to save into a folder whose other checkpoint load() would read instead of the new one."""
    for name in _FOLDER_PRIORITY[:_FOLDER_PRIORITY.index(written)]:
        if (folder / name).exists():
            raise CheckpointError(f"folder '{folder}' holds another checkpoint ({name}) that load() would read "
                                  "instead of the one being saved; save into an empty folder or remove that file")


def save(model: CLIP, path: str | Path, format: Format = "clipforge") -> Path:
    """Write model in clipforge (one .safetensors file), open_clip hub or Hugging Face format.

    Returns the file (clipforge with a .safetensors path) or folder written. Every file is written
    atomically, a folder's files all together; a failure (a full disk) is a ``WriteError`` sentence
    and leaves what was there before intact.
    """
    path = Path(path)
    config: ModelConfig = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if format == "clipforge":
        target = path if path.suffix == ".safetensors" else path / CLIPFORGE_WEIGHTS_NAME
        if target.parent == path:
            _refuse_shadowed(path, CLIPFORGE_WEIGHTS_NAME)
        metadata = {"format": CLIPFORGE_FORMAT, "config": json.dumps(config.to_dict())}
        atomic_write(target, lambda tmp: _write_safetensors(state, tmp, metadata))
        return target
    if format == "open_clip":
        config_data = open_clip_format.to_open_clip_config(config)  # refuses what open_clip cannot hold
        weights = open_clip_format.to_custom_text_layout(state, config)
        with staged_folder(path, replaces=(open_clip_format.SAFE_WEIGHTS_NAME + ".index.json",)) as stage:
            _write_safetensors(weights, stage / open_clip_format.SAFE_WEIGHTS_NAME)
            _write_json(config_data, stage / open_clip_format.CONFIG_NAME)
        return path
    if format == "hf":
        hf_state, hf_config = hf.openai_to_hf(state, config), hf.to_hf_config(config)
        processor = hf.to_hf_preprocessor_config(config)
        _refuse_shadowed(path, HF_CONFIG_NAME)
        with staged_folder(path, replaces=("model.safetensors.index.json",)) as stage:
            _write_safetensors(hf_state, stage / "model.safetensors", {"format": "pt"})
            _write_json(hf_config, stage / HF_CONFIG_NAME)
            if processor is not None:
                _write_json(processor, stage / "preprocessor_config.json")
            if config.text is not None:
                save_hf_tokenizer_files(get_tokenizer(), stage, config.text.context_length)
        return path
    raise ConfigError(f"unknown checkpoint format {short(format)}; choose 'clipforge', 'open_clip' or 'hf'")
