"""One check for every ``--device`` (and training's ``device`` field), so a bad one fails before any work.

torch accepts ``torch.device("cuda:7")`` on a machine without that GPU and only fails at the first
tensor moved there, deep inside loading, with a message about CUDA drivers; this turns every such
case into one sentence naming the option.
"""

from __future__ import annotations

import re

import torch

from clipforge.errors import ClipforgeError

_FORMS = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(text: str, option: str = "--device") -> torch.device:
    """The torch device ``text`` names, after checking this machine has it; ``option`` names it in errors.

    ``auto`` is the first GPU when torch sees one, else the CPU.
    """
    name = str(text).strip().lower()
    shown = name if len(name) <= 40 else name[:37] + "..."
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ClipforgeError(f"{option} mps was asked for but torch sees no Apple GPU; use {option} cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ClipforgeError(f"{option} {shown!r} is not a device; use {_FORMS}")
    if not torch.cuda.is_available():
        raise ClipforgeError(f"{option} {shown}: CUDA was asked for but torch sees no GPU; use {option} cpu")
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match.group(1) is not None else None
    if index is not None and index >= count:
        raise ClipforgeError(f"{option} {shown} asks for GPU {index} but torch sees {count} GPU(s), "
                             f"cuda:0 to cuda:{count - 1}; pick one of those or use {option} cpu")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")
