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
from clipforge.checkpoints.atomic import atomic_write
from clipforge.checkpoints.download import RELEASED, download_verified
from clipforge.checkpoints.infer import infer_config
from clipforge.checkpoints.weights import load_state_dict_into, read_weights_file, unwrap_state_dict
from clipforge.errors import CheckpointError, ClipforgeError, DownloadError, UnknownModelError
from clipforge.models.clip import CLIP
from clipforge.models.config import ModelConfig, config_from_dict
from clipforge.models.factory import ALIASES, available_models
from clipforge.tokenizer import get_tokenizer
from clipforge.tokenizer.hf_files import save_hf_tokenizer_files
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD, image_transform

CLIPFORGE_FORMAT = "clipforge"
CLIPFORGE_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
Format = Literal["clipforge", "open_clip", "hf"]


def released_models() -> list[str]:
    """Names that load() downloads from OpenAI."""
    return list(RELEASED)


def _resolve(source: str | Path, cache_dir: str | Path | None) -> tuple[Path, str]:
    text = str(source)
    if text.startswith("hf-hub:"):
        return _from_hub(text[len("hf-hub:"):], cache_dir), text
    path = Path(text).expanduser()
    if path.exists():
        return path, path.stem
    name = ALIASES.get(text, text)
    if name in RELEASED:
        return download_verified(RELEASED[name], cache_dir), name
    if name in available_models():
        raise UnknownModelError(f"'{text}' is an architecture without released weights; use "
                                f"clipforge.create_model('{text}') for a randomly initialised model")
    raise UnknownModelError(
        f"'{text}' is neither an existing file or folder nor a released model; released models are "
        f"{', '.join(RELEASED)}; hub models are written 'hf-hub:ORG/REPO'"
    )


def _from_hub(repo_id: str, cache_dir: str | Path | None) -> Path:
    """Fetch configs first, then only the one weights file the format needs (never .bin and .safetensors both)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir,
                                                        allow_patterns=["*.json", "*.txt"]))
        if (folder / open_clip_format.CONFIG_NAME).is_file():
            candidates = [open_clip_format.SAFE_WEIGHTS_NAME, open_clip_format.WEIGHTS_NAME]
        else:
            candidates = ["model.safetensors", "pytorch_model.bin"]
        for name in candidates:
            index = folder / f"{name}.index.json"
            files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else [name]
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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"'{path}' is not valid JSON ({error}); download or save it again") from None


def _read_folder_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        index = folder / (name + ".index.json")
        if index.is_file():  # sharded Hugging Face weights
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(unwrap_state_dict(read_weights_file(folder / shard)[0], folder / shard))
            return state
        if (folder / name).is_file():
            return unwrap_state_dict(read_weights_file(folder / name)[0], folder / name)
    raise CheckpointError(f"folder '{folder}' has none of the weight files {', '.join(names)}")


def _read_source(path: Path, name: str, quick_gelu: bool | None) -> tuple[ModelConfig, dict, dict[str, Any]]:
    """(config, OpenAI-layout state dict, preprocessing settings) for a local file or folder."""
    preprocess: dict[str, Any] = {"mean": OPENAI_MEAN, "std": OPENAI_STD}
    if path.is_dir():
        if (path / open_clip_format.CONFIG_NAME).is_file():
            config, preprocess = open_clip_format.from_open_clip_config(
                _read_json(path / open_clip_format.CONFIG_NAME), name)
            state = _read_folder_weights(path, (open_clip_format.SAFE_WEIGHTS_NAME, open_clip_format.WEIGHTS_NAME))
        elif (path / HF_CONFIG_NAME).is_file():
            config = hf.from_hf_config(_read_json(path / HF_CONFIG_NAME), name)
            state = hf.hf_to_openai(_read_folder_weights(path, ("model.safetensors", "pytorch_model.bin")))
            if (path / "preprocessor_config.json").is_file():
                processor = _read_json(path / "preprocessor_config.json")
                preprocess = {"mean": tuple(processor.get("image_mean", OPENAI_MEAN)),
                              "std": tuple(processor.get("image_std", OPENAI_STD))}
        elif (path / CLIPFORGE_WEIGHTS_NAME).is_file():
            return _read_source(path / CLIPFORGE_WEIGHTS_NAME, name, quick_gelu)
        else:
            raise CheckpointError(f"folder '{path}' is not a CLIP checkpoint: it has no open_clip_config.json, "
                                  f"config.json or {CLIPFORGE_WEIGHTS_NAME}")
    else:
        content, metadata = read_weights_file(path)
        if metadata.get("format") == CLIPFORGE_FORMAT:
            config = config_from_dict(json.loads(metadata["config"]), name)
            state = content
        elif isinstance(content, dict) and isinstance(content.get("config"), dict):  # clipforge training checkpoint
            config = config_from_dict(content["config"], name)
            state = unwrap_state_dict(content, path)
        else:
            state = unwrap_state_dict(content, path)
            if hf.is_hf_state_dict(state):
                raise CheckpointError(f"'{path}' holds Hugging Face weights without their config; pass the folder "
                                      "that contains config.json")
            config = infer_config(state, quick_gelu=True if quick_gelu is None else quick_gelu, name=name)
    if quick_gelu is not None and quick_gelu != config.quick_gelu:
        config = config.replace(quick_gelu=quick_gelu, name=name)
    return config, state, preprocess


def load(source: str | Path, device: str | torch.device = "cpu", jit: bool = False,
         download_root: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
         quick_gelu: bool | None = None, cache_dir: str | Path | None = None
         ) -> tuple[CLIP, Callable[[Any], torch.Tensor]]:
    """A CLIP model in eval mode and its preprocessing transform, from any supported source.

    The first four parameters are those of OpenAI's ``clip.load`` (``download_root`` is an alias
    of ``cache_dir``). quick_gelu overrides the activation for formats that do not record it
    (OpenAI state dicts are QuickGELU; open_clip checkpoints trained with GELU need False).
    """
    if jit:
        raise ClipforgeError("clipforge does not run TorchScript graphs; call load(..., jit=False) (the default) "
                             "to get the same model as a regular module")
    path, name = _resolve(source, cache_dir if cache_dir is not None else download_root)
    config, state, preprocess = _read_source(path, name, quick_gelu)
    model = CLIP(config)
    load_state_dict_into(model, state, str(source))
    model = model.to(device=device, dtype=dtype).eval()
    return model, image_transform(config.vision.image_size, mean=preprocess["mean"], std=preprocess["std"])


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def _save_safetensors(state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    atomic_write(target, lambda tmp: save_file(_tensors(state), str(tmp), metadata=metadata))


def _save_json(data: dict[str, Any], target: Path) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def save(model: CLIP, path: str | Path, format: Format = "clipforge") -> Path:
    """Write model in clipforge (one .safetensors file), open_clip hub or Hugging Face format.

    Returns the file (clipforge with a .safetensors path) or folder written.
    """
    path = Path(path)
    config: ModelConfig = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if format == "clipforge":
        target = path if path.suffix == ".safetensors" else path / CLIPFORGE_WEIGHTS_NAME
        _save_safetensors(state, target, {"format": CLIPFORGE_FORMAT, "config": json.dumps(config.to_dict())})
        return target
    if format == "open_clip":
        _save_safetensors(state, path / open_clip_format.SAFE_WEIGHTS_NAME)
        _save_json(open_clip_format.to_open_clip_config(config), path / open_clip_format.CONFIG_NAME)
        return path
    if format == "hf":
        hf_state = hf.openai_to_hf(state, config)
        _save_safetensors(hf_state, path / "model.safetensors", {"format": "pt"})
        _save_json(hf.to_hf_config(config), path / HF_CONFIG_NAME)
        _save_json(hf.to_hf_preprocessor_config(config), path / "preprocessor_config.json")
        save_hf_tokenizer_files(get_tokenizer(), path, config.text.context_length)
        return path
    raise ValueError(f"unknown format {format!r}; choose 'clipforge', 'open_clip' or 'hf'")
