"""Training checkpoints: atomic writes, the last K kept, and ``latest`` discovery for resume.

A checkpoint holds everything needed to continue bit-for-bit: model, optimiser, scaler, the
step/epoch position in the data, RNG states, and the counters of the run. It is a plain dict
of tensors and numbers, readable with ``torch.load(weights_only=True)`` and by ``clipforge.load``.

An FSDP run writes the same step_N.pt and, beside it, step_N.dcp/: the model and optimiser as
per-rank shards (torch.distributed.checkpoint) plus ``train_state.pt``, the rest of the checkpoint.
An FSDP resume reads the folder when it is complete; anything else reads the .pt. The folder is
written under a temporary name and renamed once every rank is done; it is pruned with its .pt.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from clipforge.checkpoints.atomic import TEMP_MARK, atomic_write
from clipforge.checkpoints.weights import verify_zip
from clipforge.errors import CheckpointError

_NAME = re.compile(r"step_(\d+)\.pt$")
SHARDED_STATE = "train_state.pt"  # in step_N.dcp/: everything of step_N.pt but the model and optimiser
WEIGHT_KEYS = ("model", "optimizer")


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


def _write_torch(state: dict[str, Any], path: Path) -> None:
    """torch.save through a Python file, so that a full disk surfaces as OSError(ENOSPC) for atomic_write to name."""
    with open(path, "wb") as handle:
        torch.save(state, handle)


def sharded_path(checkpoint: str | Path) -> Path:
    """step_N.dcp beside step_N.pt."""
    return Path(checkpoint).with_suffix(".dcp")


def sharded_staging(output_dir: str | Path, step: int) -> Path:
    """Where step_N.dcp is written before its rename: a name remove_stale_temp_files clears after a kill."""
    return checkpoint_dir(output_dir) / f".step_{step:08d}.dcp{TEMP_MARK}dcpstage"


def is_complete_sharded(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and (folder / SHARDED_STATE).is_file()


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int,
                    sharded: bool = False) -> Path:
    """Write step_N.pt through a temporary file and os.replace, then prune all but the newest keep_last.

    ``sharded``: also start step_N.dcp's staging folder with train_state.pt; the ranks add their shards.
    """
    # A full disk raises atomic_write's one-sentence WriteError; the previous checkpoints stay intact.
    target = atomic_write(checkpoint_dir(output_dir) / f"step_{step:08d}.pt", lambda tmp: _write_torch(state, tmp))
    shutil.rmtree(sharded_path(target), ignore_errors=True)  # another run's: it would shadow this .pt
    if sharded:
        stage = sharded_staging(output_dir, step)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        rest = {key: value for key, value in state.items() if key not in WEIGHT_KEYS}
        atomic_write(stage / SHARDED_STATE, lambda tmp: _write_torch(rest, tmp))
    kept = list_checkpoints(output_dir)[-keep_last:]
    for old in list_checkpoints(output_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    kept_names = {sharded_path(path).name for path in kept}
    for folder in checkpoint_dir(output_dir).glob("step_*.dcp"):
        if folder.name not in kept_names:
            shutil.rmtree(folder, ignore_errors=True)
    return target


def publish_sharded(output_dir: str | Path, step: int) -> Path:
    """Rename the finished staging folder to step_N.dcp (main process, after every rank wrote its shards)."""
    target = sharded_path(checkpoint_dir(output_dir) / f"step_{step:08d}.pt")
    shutil.rmtree(target, ignore_errors=True)
    sharded_staging(output_dir, step).rename(target)
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


def refuse_later_checkpoints(output_dir: str | Path, start_step: int) -> None:
    """Starting below a checkpoint already in output_dir would prune the new run's checkpoints as 'older'."""
    latest = latest_checkpoint(output_dir)
    if latest is not None and int(_NAME.search(latest.name).group(1)) > start_step:
        raise CheckpointError(f"output_dir '{output_dir}' holds a later checkpoint ({latest.name}) than this run "
                              f"starts from (step {start_step}); use resume = \"auto\", choose another output_dir, "
                              "or delete the later checkpoints")


def _load_plain(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def restore(state: dict[str, Any], path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, load_weights: Callable[..., None] = _load_plain,
            required: tuple[str, ...] = WEIGHT_KEYS) -> None:
    """Load a training checkpoint into the run; a model file or another architecture is one clear sentence.

    ``load_weights(state, model, optimizer)`` puts the weights in (FSDP: shards them, or reads step_N.dcp);
    ``required``: the weight keys state itself must hold (none for step_N.dcp's train_state.pt).
    """
    missing = [key for key in (*required, "scaler", "rng", "step") if key not in state]
    if missing:
        raise CheckpointError(f"'{path}' is not a training checkpoint (no {missing[0]}); to start from its weights "
                              "use init_from instead of resume")
    try:
        load_weights(state, model, optimizer)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0][:150]
        raise CheckpointError(f"training checkpoint '{path}' does not fit this model ({first}); resume with the "
                              "config that wrote it, or set resume = \"none\" with a new output_dir") from None
    scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's content, after checking every zip member's CRC (damage is refused, never resumed)."""
    try:
        verify_zip(Path(path))
    except CheckpointError as error:  # its sentence names the file already; say what to do about it here
        damage = str(error).split(" (", 1)[-1].split(")")[0][:80]
        raise CheckpointError(f"training checkpoint '{path}' is damaged ({damage}); delete it to resume from "
                              "the previous one") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # a refused object, or damage without a CRC: one clear sentence either way
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise CheckpointError(f"training checkpoint '{path}' cannot be read ({reason}); "
                              "delete it to resume from the previous one") from None
