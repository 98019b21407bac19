"""Atomic file writes: a crash or a full disk never leaves a half-written checkpoint in place.

A file is written to a temporary ``.NAME.tmp-XXXXXXXX`` beside it, flushed to disk, given the mode a
plain ``open()`` would give it (the old file's, else 0666 less the umask), then renamed over the
target. A folder of files (open_clip, Hugging Face) is written into a ``.tmp-XXXXXXXX`` folder inside
it and moved in only once every file is complete. A failed write raises ``WriteError`` (a
``CheckpointError`` and an ``OSError``) naming the file and the fix, leaves the previous file as it
was and removes the temporary. A process killed mid-write leaves its temporary behind:
``remove_stale_temp_files`` clears those.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from clipforge.checkpoints.files import first_line
from clipforge.errors import CheckpointError

TEMP_MARK = ".tmp-"
# ours (".NAME.tmp-XXXXXXXX", ".tmp-XXXXXXXX") and those of clipforge before 2026-11 (".NAME.XXXXXXXX.tmp")
_TEMP_NAME = re.compile(r"\.(.+\.)?tmp-[a-z0-9_]{8}|\..+\.[a-z0-9_]{8}\.tmp")
_REASONS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on device", "free space on that disk or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free space or write somewhere else"),
    errno.EACCES: ("permission denied", "choose a folder you can write to or change its permissions"),
    errno.EPERM: ("permission denied", "choose a folder you can write to or change its permissions"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
    errno.EISDIR: ("a folder is in the way", "choose another path"),
    errno.ENOTDIR: ("a file is in the way of a folder", "choose another path"),
    errno.EEXIST: ("a file is in the way of a folder", "choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("an input/output error", "check the disk"),
}
# Phrases of write failures that torch and safetensors report without an OSError attached.
_IO_PHRASES = ("No space left on device", "os error", "I/O error", "PytorchStreamWriter", "file write failed",
               "unexpected pos", "iostream error")


class WriteError(CheckpointError, OSError):
    """A file could not be written; the previous file is intact. ``errno`` (where known) and ``strerror`` are set."""

    def __str__(self) -> str:  # the sentence, not OSError's "[Errno N] ..."
        return str(self.args[0]) if self.args else ""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _errno_of(error: BaseException) -> int | None:
    """The OS error code behind a failed write, looking through chained exceptions and library messages."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(current))
        if found:
            return int(found.group(1) or found.group(2))
        if "No space left on device" in str(current):
            return errno.ENOSPC
        current = current.__cause__ or current.__context__
    return None


def _is_io_failure(error: BaseException) -> bool:
    current: BaseException | None = error
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, OSError) or any(phrase in str(current) for phrase in _IO_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


def write_error(error: BaseException, target: Path, existed: bool, what: str = "file") -> WriteError:
    """One sentence for a failed write of target: what happened, the fix, and that nothing was damaged."""
    code = _errno_of(error)
    reason, fix = _REASONS.get(code, (None, "check free space and permissions there"))
    if reason is None:
        reason = f"an error ({first_line(getattr(error, 'strerror', None) or error, 80)})"
    kept = f"the previous {what} {'are' if what.endswith('s') else 'is'} intact" if existed else "nothing was written"
    failure = WriteError(f"{reason} writing '{target}'; {fix} ({kept})")
    failure.errno, failure.strerror = code, reason
    return failure


def _make_folder(folder: Path, target: Path) -> bool:
    """Create folder (and parents); whether it had to be created."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(error, target, existed=False) from None
    return True


def _mode(target: Path) -> int:
    """The mode open() would leave: the existing file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def _fsync(path: Path) -> None:
    with open(path, "rb") as written:
        os.fsync(written.fileno())


def fsync_folder(folder: Path) -> None:
    """Make renames in folder durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(temporary path) in target's folder, flush it to disk, then rename it over target."""
    target = Path(target)
    existed = target.exists()
    _make_folder(target.parent, target)
    prefix = f".{target.name[:200]}{TEMP_MARK}"
    try:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=prefix)
    except OSError as error:
        raise write_error(error, target, existed) from None
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, _mode(target))  # mkstemp made it 0600
        _fsync(temporary)
        os.replace(temporary, target)
    except Exception as error:
        if not _is_io_failure(error):
            raise  # a bug, not the disk: keep its traceback
        raise write_error(error, target, existed) from error
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    fsync_folder(target.parent)
    return target


@contextlib.contextmanager
def staged_folder(folder: str | Path, replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary folder inside folder; what the block writes there moves into folder when it ends without error.

    Files in folder named in ``replaces`` (such as a sharded index that would shadow the new weights)
    are removed once the new files are in. On failure folder is left as it was.
    """
    folder = Path(folder)
    created = _make_folder(folder, folder)
    try:
        stage = Path(tempfile.mkdtemp(dir=folder, prefix=TEMP_MARK))
    except OSError as error:
        raise write_error(error, folder, existed=not created, what="files") from None
    target, done = folder, False
    try:
        yield stage
        written = sorted(stage.iterdir())
        for file in written:
            target = folder / file.name
            os.chmod(file, _mode(target))  # writers such as safetensors may leave 0600
            _fsync(file)
        for file in written:
            target = folder / file.name
            os.replace(file, target)
        for name in replaces:
            (folder / name).unlink(missing_ok=True)
        done = True
    except Exception as error:
        if not _is_io_failure(error):
            raise
        name = getattr(error, "filename", None)
        if target == folder and isinstance(name, (str, os.PathLike)) and Path(name).parent == stage:
            target = folder / Path(name).name  # the file the block was writing
        raise write_error(error, target, existed=not created, what="files") from error
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not done:
            with contextlib.suppress(OSError):
                folder.rmdir()
    fsync_folder(folder)


def is_temp_file(path: str | Path) -> bool:
    """Whether a name is one of atomic_write's or staged_folder's temporaries."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def remove_stale_temp_files(folder: str | Path, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temporaries that killed writes left in folder (not its subfolders); return what was removed.

    Call it when no other process writes into folder, or pass min_age_s to spare temporaries modified
    more recently than that. What cannot be removed (permissions) is skipped: it never stops a run.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_file(entry):
            continue
        try:
            info = entry.lstat()
            if now - info.st_mtime < min_age_s:
                continue
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed
