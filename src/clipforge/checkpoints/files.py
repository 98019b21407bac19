"""The small files around checkpoint weights, read so that nothing in them can crash clipforge.

JSON configs and shard indexes may be damaged, hand-edited or not JSON at all; each problem
becomes one ``CheckpointError`` sentence naming the file (and the field) and the fix. Messages
never echo a huge value or a library's multi-line explanation: ``short`` and ``first_line`` cut them.
"""

from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

from clipforge.errors import CheckpointError, shorten

_FIX = "fix the file or download it again"
_HUB_ID = re.compile(r"(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b")  # huggingface_hub's validate_repo_id rule


def cut(text: str, limit: int) -> str:
    """text on one line, shortened to limit characters, '...' marking the cut."""
    return shorten(text, limit)


def short(value: Any, limit: int = 40) -> str:
    """repr(value) on one line and at most limit characters."""
    return cut(repr(value), limit)


def first_line(error: BaseException | str, limit: int = 120) -> str:
    """The first line of an error's text, at most limit characters (the type name if it has no text)."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return cut(text, limit)


def os_reason(error: OSError) -> str:
    """A few words for an OSError ('permission denied', 'no space left on device', ...)."""
    reasons = {errno.ENOENT: "it does not exist", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EISDIR: "it is a folder", errno.ENOTDIR: "a part of the path is not a folder",
               errno.ELOOP: "a symbolic link loops", errno.EIO: "an input/output error"}
    return reasons.get(error.errno) or first_line(error.strerror or error, 80).lower()


def json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is one sentence naming the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"'{path}' cannot be read ({os_reason(error)}); check the path and its permissions"
                              ) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark from a Windows editor is harmless
    except UnicodeDecodeError as error:
        raise CheckpointError(f"'{path}' is not UTF-8 text (bad byte at offset {error.start}); {_FIX}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"'{path}' is not valid JSON ({error.msg} at line {error.lineno} column "
                              f"{error.colno}); {_FIX}") from None
    except RecursionError:
        raise CheckpointError(f"'{path}' nests JSON too deeply to be a config; {_FIX}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' holds {json_type(data)}, not a JSON object; {_FIX}")
    return data


def field_error(source: Any, field: str, value: Any, expected: str) -> CheckpointError:
    """'<file> sets <field> to <value>, which is not <expected>; fix ...'."""
    return CheckpointError(f"{source} sets {field} to {short(value)}, which is not {expected}; {_FIX}")


def positive_int(value: Any, field: str, source: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise field_error(source, field, value, "a positive integer")
    return value


def positive_number(value: Any, field: str, source: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise field_error(source, field, value, "a positive number")
    return value


def optional_object(value: Any, field: str, source: Any) -> dict[str, Any]:
    """A JSON object, or {} for null / absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise field_error(source, field, value, "an object")
    return value


def boolean(value: Any, field: str, source: Any) -> bool:
    if not isinstance(value, bool):
        raise field_error(source, field, value, "true or false")
    return value


def read_weight_map(index: Path) -> dict[str, str]:
    """tensor name -> weight file, from a sharded checkpoint's ``*.index.json`` (relative paths, checked)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"'{index}' has no weight_map object naming each tensor's shard; download the index "
                              "again")
    for key, shard in weight_map.items():
        parts = PurePosixPath(shard).parts if isinstance(shard, str) and shard and "\0" not in shard else ()
        if not parts or parts[0] == "/" or ".." in parts or "\\" in shard:
            raise CheckpointError(f"'{index}' maps tensor {short(key)} to {short(shard)}, which is not a file name "
                                  "in its folder; download the index again")
    return weight_map


def shard_files(index: Path) -> list[str]:
    """The weight files a sharded checkpoint's index names, each once."""
    return sorted(set(read_weight_map(index).values()))


def check_hub_id(repo_id: str) -> None:
    """Refuse what cannot be a Hugging Face repository id before any network access."""
    if not _HUB_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise CheckpointError(f"{cut(repr('hf-hub:' + repo_id), 70)} is not a Hugging Face repository id; write "
                              "hf-hub:ORG/REPO with letters, digits, '-', '_' and '.'")
