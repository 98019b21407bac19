"""Read raw weights from any file a CLIP user has, without unpickling arbitrary objects.

Formats: safetensors; PyTorch zip/legacy files (read with ``weights_only=True``);
TorchScript archives such as OpenAI's released ``.pt`` files (read with ``torch.jit.load``,
which rebuilds TorchScript modules only and runs no Python code).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import CheckpointError

# Keys that some formats store beside the weights and that no module owns.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint '{path}' is truncated or corrupt ({type(error).__name__}: {error}); "
        "download or save it again"
    )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata stored in a safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise _corrupt(path, error) from None


def read_torch_file(path: Path) -> Any:
    """A PyTorch file's content (weights_only), or a TorchScript archive's state dict."""
    if _is_torchscript(path):
        try:
            return {key: value for key, value in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
        except RuntimeError as error:
            raise _corrupt(path, error) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=None)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise _corrupt(path, error) from None
    except Exception as error:  # pickle.UnpicklingError for objects weights_only refuses
        raise CheckpointError(
            f"checkpoint '{path}' holds Python objects that clipforge will not unpickle for safety "
            f"({error}); re-save it as a plain state dict or safetensors"
        ) from None


def read_weights_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty; download or save it again")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path), {}


def unwrap_state_dict(content: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights inside a training checkpoint, with DDP/compile prefixes removed."""
    if isinstance(content, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors; it is not a CLIP checkpoint")
    state_dict = {}
    for key, value in content.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    return state_dict


def load_state_dict_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights into a model, casting dtype, and name every missing, extra or misshapen key."""
    expected = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes {_some(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{source}' does not fit the {model.config.name} architecture: {'; '.join(problems)}; "
            "pass the matching model config, or check the file is a CLIP checkpoint"
        )
    with torch.no_grad():
        for key, value in state_dict.items():
            expected[key].copy_(value)


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
