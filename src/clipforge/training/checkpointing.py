"""Training checkpoints: atomic writes, the last K kept, and ``latest`` discovery for resume.

A checkpoint holds everything needed to continue bit-for-bit: model, optimiser, scaler, the
step/epoch position in the data, RNG states, and the counters of the run. It is a plain dict
of tensors and numbers, readable with ``torch.load(weights_only=True)`` and by ``clipforge.load``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.atomic import atomic_write
from clipforge.errors import CheckpointError

_NAME = re.compile(r"step_(\d+)\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write step_N.pt through a temporary file and os.replace, then prune all but the newest keep_last."""
    target = atomic_write(checkpoint_dir(output_dir) / f"step_{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(output_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return target


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """auto: the latest checkpoint if one exists; latest: it must exist; a path; or none."""
    if resume is None or resume.lower() == "none":
        return None
    if resume in ("auto", "latest"):
        found = latest_checkpoint(output_dir)
        if found is None and resume == "latest":
            raise CheckpointError(f"--resume latest: no checkpoint in '{checkpoint_dir(output_dir)}'; "
                                  "start without --resume or point --output-dir at the earlier run")
        return found
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint '{path}' does not exist; check the path or use --resume latest")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, refused object: one clear sentence either way
        raise CheckpointError(f"training checkpoint '{path}' cannot be read ({type(error).__name__}: {error}); "
                              "delete it to resume from the previous one") from None
