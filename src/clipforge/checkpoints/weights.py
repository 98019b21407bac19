"""Read raw weights from any file a CLIP user has, without unpickling arbitrary objects or loading damaged data.

Formats, recognised from the file's first bytes (the suffix may lie): safetensors; PyTorch zip and
legacy files (read with ``weights_only=True``); TorchScript archives such as OpenAI's released
``.pt`` files (read with ``torch.jit.load``, which rebuilds TorchScript modules only and runs no
Python code). Before use, every zip archive has the CRC-32 of every member checked (streamed;
about 0.1 s for 300 MB here) and a safetensors file has its header checked against the file's
size. Legacy (pre-1.6, non-zip) PyTorch files carry no checksum: a truncated one is refused, but
flipped bytes inside their tensor data cannot be detected.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.files import cut, first_line, os_reason, read_weight_map, short
from clipforge.errors import CheckpointError

# Keys that some formats store beside the weights and that no module owns.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
_CHUNK = 1 << 20  # bytes read at a time when checking a zip member's CRC
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit


def _corrupt(path: Path, error: BaseException | str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}' is truncated or corrupt ({first_line(error, 90)}); "
                           "download or save it again")


def _is_torchscript(names: list[str]) -> bool:
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def verify_zip(path: Path) -> list[str]:
    """The archive's member names, after checking the CRC-32 of every member (1 MiB at a time)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    while member.read(_CHUNK):
                        pass
            return archive.namelist()
    except Exception as error:  # BadZipFile ("Bad CRC-32 for file ..."), EOFError, zlib.error, ...: all damage
        raise _corrupt(path, error) from None


def check_safetensors_layout(path: Path) -> None:
    """Refuse a safetensors file whose header is damaged or whose tensors reach past its end."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > size - 8 or length > _MAX_SAFETENSORS_HEADER:
            raise _corrupt(path, f"its header claims {length} bytes but the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {short(name)} has no valid data_offsets")
        if offsets[1] > data_size:
            raise _corrupt(path, f"tensor {short(name)} ends at byte {8 + length + offsets[1]} of a {size}-byte file")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata stored in a safetensors header."""
    from safetensors import safe_open

    check_safetensors_layout(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise _corrupt(path, error) from None


def _refused_objects(path: Path, error: BaseException) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (such as {cut(found.group(1), 60)})" if found else ""
    return CheckpointError(f"checkpoint '{path}' holds Python objects{what} that clipforge will not unpickle for "
                           "safety; re-save it as a plain state dict or safetensors")


def read_torch_file(path: Path) -> Any:
    """A PyTorch file's content (weights_only), or a TorchScript archive's state dict; zip archives CRC-checked."""
    with open(path, "rb") as handle:
        is_zip = _sniff(handle.read(64)) == "zip"  # by the first bytes: zipfile.is_zipfile may find one inside a pickle
    names = verify_zip(path) if is_zip else None
    if names is not None and _is_torchscript(names):
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as error:
            raise _corrupt(path, error) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=None)
    except pickle.UnpicklingError as error:  # weights_only refusing an object, or bytes that are no pickle
        if re.search(r"GLOBAL|safe_globals|unrecognized function", str(error)):
            raise _refused_objects(path, error) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))  # past torch's advice to unpickle
        raise _corrupt(path, detail.group(1) if detail else error) from None
    except Exception as error:  # RuntimeError, EOFError, BadZipFile, ValueError, ...: a damaged file
        raise _corrupt(path, error) from None


def _sniff(head: bytes) -> str:
    """The format a file's first bytes announce."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) > 8 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"\x80"):  # pickle protocol 2+: a legacy torch.save file
        return "pickle"
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    return "unknown"


def _open_head(path: Path) -> bytes:
    """The first bytes of a regular, non-empty, readable file; anything else is one sentence."""
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"checkpoint '{path}' is a symbolic link to '{cut(os.readlink(path), 80)}', which "
                                  "does not exist; download it again or fix the link")
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder where a weights file is expected; pass the file, "
                              "or pass the folder to clipforge.load")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a regular file (a device or pipe); pass a weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty; download or save it again")
    try:
        with open(path, "rb") as handle:
            return handle.read(64)
    except OSError as error:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({os_reason(error)}); check its permissions"
                              ) from None


def read_weights_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    """(content, safetensors metadata) of a weights file, whatever its suffix says."""
    path = Path(path)
    head = _open_head(path)
    kind = _sniff(head)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind in ("zip", "pickle"):
        return read_torch_file(path), {}
    if kind == "lfs":
        raise CheckpointError(f"checkpoint '{path}' is a Git LFS pointer, not the weights; run 'git lfs pull' in its "
                              "repository or download the file again")
    raise CheckpointError(f"checkpoint '{path}' is not a PyTorch, TorchScript or safetensors file (it begins "
                          f"{short(head[:20], 50)}); download or save it again")


def read_folder_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The first of names in folder, whole or sharded (``NAME.index.json``), read and unwrapped."""
    for name in names:
        index = folder / f"{name}.index.json"
        if index.is_file():
            return _read_shards(folder, index)
        whole = folder / name
        if whole.is_file() or whole.is_symlink():  # a dangling link (a cleared hub cache) gets its own message
            return unwrap_state_dict(read_weights_file(whole)[0], whole)
    raise CheckpointError(f"folder '{folder}' has none of the weight files {', '.join(names)}")


def _read_shards(folder: Path, index: Path) -> dict[str, torch.Tensor]:
    """Every shard an index names, each checked to hold the tensors the index places in it."""
    mapping = read_weight_map(index)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(mapping.values())):
        path = folder / shard
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"'{index}' names shard {short(shard, 60)}, which is missing; download it again")
        content = read_weights_file(path)[0]
        lacking = next((key for key, where in mapping.items() if where == shard and
                        not (isinstance(content, dict) and key in content)), None)
        if lacking is not None:
            raise CheckpointError(f"shard '{path}' lacks tensor {short(lacking, 60)}, which '{index.name}' places in "
                                  "it; the shards do not belong together, download them again")
        state.update(unwrap_state_dict(content, path))
    return state


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
    shown = ", ".join(cut(item, 80) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
