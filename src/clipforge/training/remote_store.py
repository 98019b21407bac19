"""A run's remote copy (``remote_sync``): its layout, which checkpoints in it are complete, pruning, download.

Layout under the URL, the same as output_dir's::

    metrics.jsonl  skipped.tsv  training_curves.png  tensorboard/...
    checkpoints/step_00000012.pt
    checkpoints/step_00000012.dcp/...            sharded (FSDP) checkpoints, when the run writes them
    checkpoints/step_00000012.manifest.json      written LAST: {"step": 12, "files": {"step_00000012.pt": bytes, ...}}

Why a manifest rather than copy-to-a-temporary-name-then-rename: on object stores (s3, gs) a rename
is a second full copy plus a delete, and a folder of shards cannot be renamed at once anyway. A
checkpoint counts as complete only when its manifest exists and every file it lists is there with
the listed size, so a reader (resume) never sees an upload that was cut short (network down, job
killed). A writer deletes an old manifest before rewriting the files it lists, and pruning deletes
the manifest before the files. Any fsspec URL works (file://, memory://, s3://, gs://); http(s)://
mirrors are read-only (fsspec lists a directory index page such as python's http.server serves).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from clipforge.checkpoints.atomic import TEMP_MARK, atomic_write
from clipforge.errors import ClipforgeError, shorten

_ENTRY = re.compile(r"step_(\d+)\.(pt|dcp|manifest\.json)$")
_CHUNK = 8 << 20
READ_ONLY_PROTOCOLS = ("http", "https")


def step_name(step: int) -> str:
    """step_00000012: the stem of a checkpoint's .pt, .dcp/ and .manifest.json (checkpointing's naming)."""
    return f"step_{step:08d}"


def reason(error: BaseException) -> str:
    """An exception as 'Type: first line', short enough to quote inside one sentence."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return shorten(f"{type(error).__name__}: {text}" if text else type(error).__name__, 120)


def open_url(url: str, field: str) -> tuple[Any, str]:
    """fsspec's file system and path for url; a protocol without its package is one sentence naming field."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # "Install s3fs to access S3", "Protocol not known: foo"
        raise ClipforgeError(f"{field} '{shorten(url, 100)}' cannot be opened ({reason(error)}); install the "
                             "package it names (e.g. pip install s3fs) or use another URL") from None


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class Complete:
    """A complete remote checkpoint: its step and the files its manifest lists (relative name -> bytes)."""

    step: int
    files: dict[str, int]


class RemoteStore:
    """The remote folder of one run; methods raise what fsspec raises (callers decide: warn or refuse)."""

    def __init__(self, url: str, field: str = "remote_sync", checkpoints: str = "checkpoints") -> None:
        self.url = url.rstrip("/")
        self.fs, root = open_url(self.url, field)
        self.root = root.rstrip("/")
        self.checkpoints = checkpoints
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.read_only = protocol in READ_ONLY_PROTOCOLS

    @classmethod
    def around(cls, url: str, field: str) -> tuple[RemoteStore, str]:
        """The store whose checkpoints folder holds the file at url (a ``resume`` URL), and the file's name."""
        folder, _, name = url.rstrip("/").rpartition("/")
        return cls(folder, field, checkpoints=""), name

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(part for part in parts if part)])

    # ---- reading ----
    def entries(self) -> dict[int, set[str]]:
        """step -> the names (step_N.pt, .dcp, .manifest.json) in checkpoints/; a folder that is not there (or
        cannot be, a file being in the way) holds none: writing there fails later, with a warning."""
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(self.path(self.checkpoints), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[int, set[str]] = {}
        for name in names:
            if match := _ENTRY.fullmatch(_basename(name)):
                found.setdefault(int(match.group(1)), set()).add(_basename(name))
        return found

    def manifest(self, step: int) -> dict[str, int] | None:
        """The files step's manifest lists, or None when it has none (or an unreadable one)."""
        try:
            data = json.loads(self.fs.cat_file(self.path(self.checkpoints, f"{step_name(step)}.manifest.json")))
            files = data["files"]
            if data.get("step") != step or not isinstance(files, dict) or f"{step_name(step)}.pt" not in files:
                return None
            return {str(name): int(size) for name, size in files.items()}
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or not one of ours
            return None

    def is_complete(self, files: dict[str, int]) -> bool:
        """Every listed file is there with its listed size."""
        for name, size in files.items():
            try:
                if self.fs.size(self.path(self.checkpoints, name)) != size:
                    return False
            except FileNotFoundError:
                return False
        return True

    def latest_complete(self) -> Complete | None:
        """The newest checkpoint whose manifest and files are all there; half-copied ones are passed over."""
        for step in sorted(self.entries(), reverse=True):
            files = self.manifest(step)
            if files is not None and self.is_complete(files):
                return Complete(step, files)
        return None

    # ---- writing ----
    def _write(self, target: str, source: IO[bytes], size: int) -> None:
        """Copy size bytes of an open local file to the remote path target, checking that all of them arrived."""
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        source.seek(0)
        copied = 0
        with self.fs.open(target, "wb") as out:
            while copied < size and (chunk := source.read(min(_CHUNK, size - copied))):
                out.write(chunk)
                copied += len(chunk)
        if copied != size:
            raise OSError(f"the local file ended after {copied} of {size} bytes")

    def upload_checkpoint(self, step: int, files: list[tuple[str, IO[bytes], int]]) -> None:
        """Copy a checkpoint's files (names relative to checkpoints/), then its manifest, last."""
        manifest = self.path(self.checkpoints, f"{step_name(step)}.manifest.json")
        if self.fs.exists(manifest):  # a rewrite must not look complete halfway through
            self.fs.rm_file(manifest)
        for name, handle, size in files:
            self._write(self.path(self.checkpoints, name), handle, size)
        text = json.dumps({"step": step, "files": {name: size for name, _, size in files}}, indent=1)
        with self.fs.open(manifest, "wb") as out:
            out.write(text.encode())

    def upload_files(self, files: list[tuple[str, IO[bytes], int]]) -> None:
        """Run files (metrics.jsonl, ...): plain copies; a torn last line is dropped again on resume."""
        for name, handle, size in files:
            self._write(self.path(name), handle, size)

    def _remove(self, step: int, names: set[str]) -> None:
        for suffix in (".manifest.json", ".pt", ".dcp"):  # the manifest first: the entry stops being complete
            name = f"{step_name(step)}{suffix}"
            if name in names:
                self.fs.rm(self.path(self.checkpoints, name), recursive=suffix == ".dcp")

    def prune(self, keep_last: int, keep_step: int) -> list[int]:
        """Keep the newest keep_last complete checkpoints (and keep_step); drop older ones and half-copied
        leftovers older than the newest complete one. Returns the steps removed."""
        entries = self.entries()
        complete = sorted(step for step, names in entries.items() if f"{step_name(step)}.manifest.json" in names)
        keep = set(complete[-keep_last:]) | {keep_step}
        newest = complete[-1] if complete else keep_step
        removed = []
        for step in sorted(entries):
            if step not in keep and (step in complete or step < newest):
                self._remove(step, entries[step])
                removed.append(step)
        return removed

    # ---- downloading ----
    def shards(self, stem: str) -> dict[str, int | None]:
        """stem.dcp/'s files when a checkpoint has no manifest (a hand-made mirror): one listing level."""
        try:
            names = self.fs.ls(self.path(self.checkpoints, f"{stem}.dcp"), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {f"{stem}.dcp/{_basename(name)}": None for name in names if not name.endswith("/")}

    def _get(self, name: str, local: Path, size: int | None) -> None:
        self.fs.get_file(self.path(self.checkpoints, name), str(local))
        if size is not None and local.stat().st_size != size:
            raise OSError(f"'{name}' arrived with {local.stat().st_size} of {size} bytes")

    def download(self, stem: str, files: dict[str, int | None], checkpoints: Path) -> Path:
        """Fetch stem.pt and stem.dcp/* into the local checkpoints folder; returns the local .pt. The .dcp/
        folder comes first (staged, moved in whole), so a local .pt is never without its shards."""
        checkpoints.mkdir(parents=True, exist_ok=True)
        shards = {name: size for name, size in files.items() if name.startswith(f"{stem}.dcp/")}
        if shards:
            stage = Path(tempfile.mkdtemp(dir=checkpoints, prefix=f".{stem}.dcp{TEMP_MARK}"))
            try:
                for name, size in shards.items():
                    local = stage / name.split("/", 1)[1]
                    local.parent.mkdir(parents=True, exist_ok=True)
                    self._get(name, local, size)
                target = checkpoints / f"{stem}.dcp"
                if target.exists():
                    shutil.rmtree(target)
                os.replace(stage, target)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        size = files.get(f"{stem}.pt")
        return atomic_write(checkpoints / f"{stem}.pt", lambda tmp: self._get(f"{stem}.pt", tmp, size))


def local_files(checkpoints: Path, step: int) -> list[tuple[str, IO[bytes], int]]:
    """Open step's .pt and .dcp/ files now: a later local prune may unlink them, but an open file stays
    readable (POSIX), so the background upload never loses the file it copies. Caller closes them."""
    stem = step_name(step)
    paths = [checkpoints / f"{stem}.pt"]
    shards = checkpoints / f"{stem}.dcp"
    if shards.is_dir():
        paths += sorted(p for p in shards.rglob("*") if p.is_file())
    opened: list[tuple[str, IO[bytes], int]] = []
    try:
        for path in paths:
            handle = open(path, "rb")
            opened.append((path.relative_to(checkpoints).as_posix(), handle, os.fstat(handle.fileno()).st_size))
    except OSError:
        close_all(opened)
        raise
    return opened


def close_all(files: list[tuple[str, IO[bytes], int]]) -> None:
    for _, handle, _ in files:
        handle.close()

