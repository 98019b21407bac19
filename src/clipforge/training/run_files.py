"""The run's own files in output_dir: the lock, leftovers of a killed run, metrics rolled back.

A rerun of the same command must continue where the last one stopped without duplicates or
debris, and two runs must never write to one folder. Kept free of torch at import so a lock
holder (or a test) can import it cheaply.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import IO

from clipforge.errors import ClipforgeError

LOCK_NAME = "train.lock"
SKIPPED_NAME = "skipped.tsv"  # written by loop._Skips (data.skips format)


class OutputDirLock:
    """An exclusive flock on output_dir/train.lock: the kernel drops it when the holder dies, even by SIGKILL."""

    def __init__(self, handle: IO[str] | None, path: Path) -> None:
        self._handle, self.path = handle, path

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output_dir(output_dir: str | Path) -> OutputDirLock:
    """Create output_dir and lock it; a folder held by a live run is refused, naming that run's PID."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ClipforgeError(f"output_dir '{output_dir}' is a file, not a folder; choose another output_dir") from None
    except OSError as error:
        raise ClipforgeError(f"output_dir '{output_dir}' cannot be created ({error.strerror}); choose a folder "
                             "you can write to") from None
    path = output_dir / LOCK_NAME
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as error:
        raise ClipforgeError(f"output_dir '{output_dir}' is not writable ({error.strerror}); choose a folder you "
                             "can write to") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # Some network file systems have no flock: run unguarded rather than not at all.
            warnings.warn(f"cannot lock '{path}' ({error.strerror}); make sure no other run writes to {output_dir}")
            handle.close()
            return OutputDirLock(None, path)
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ClipforgeError(f"output_dir '{output_dir}' is in use by another training run (PID {holder[:20]}); "
                             "wait for it to finish, stop it, or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return OutputDirLock(handle, path)


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete half-written temporaries a killed run left (checkpoints, metrics); call only while holding the lock."""
    from clipforge.checkpoints.atomic import remove_stale_temp_files as remove

    removed: list[Path] = []
    for folder in (Path(output_dir), Path(output_dir) / "checkpoints"):
        removed += remove(folder)
    return removed


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Drop metrics.jsonl rows after the resumed step (and a torn last line); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", 0)) <= last_step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        from clipforge.checkpoints.atomic import atomic_write

        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return dropped
