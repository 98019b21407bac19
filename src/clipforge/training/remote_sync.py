"""``remote_sync``: keep a copy of the run (checkpoints, metrics) at a URL, and resume from it.

When output_dir is lost (scratch purged, the run moved to another cluster, a single-node job on
a node-local disk), the remote copy is what the rerun resumes from. After each checkpoint save, rank 0 copies the new checkpoint (step_N.pt and
step_N.dcp/ when there is one) and the run files in a background thread, so training does not
wait for the network; the next save and the end of the run wait for it. Files are opened before
the thread starts, so the local keep_last pruning may unlink them meanwhile without harm (an open
file stays readable). A failed copy is one warning: the local checkpoint is intact and the next
save copies again. How a reader tells a complete remote checkpoint from a half-copied one:
remote_store's docstring.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

import torch.distributed as dist

from clipforge.checkpoints.atomic import atomic_write
from clipforge.errors import CheckpointError, ClipforgeError, shorten
from clipforge.training import checkpointing as ckpt
from clipforge.training.config import TrainConfig
from clipforge.training.distributed import World
from clipforge.training.remote_store import RemoteStore, close_all, local_files, reason, step_name
from clipforge.training.summary import say

RUN_FILES = ("metrics.jsonl", "skipped.tsv", "training_curves.png")  # plus tensorboard/*
_STEP = re.compile(r"step_(\d+)\.pt$")
T = TypeVar("T")


def _on_main(world: World, work: Callable[[], T]) -> T:
    """work() on rank 0 only, its result (or its one-sentence error) handed to every rank, so a refusal
    stops all ranks instead of leaving the others waiting in a collective."""
    result: Any = None
    error: str | None = None
    if world.is_main:
        try:
            result = work()
        except ClipforgeError as failure:
            error = str(failure)
    if world.distributed:
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise CheckpointError(error) from None
    return result


def _step_of(path: Path | None) -> int:
    match = _STEP.search(path.name) if path is not None else None
    return int(match.group(1)) if match else -1


# ---- resume ----
def resolve_resume(config: TrainConfig, output_dir: Path, world: World) -> Path | None:
    """checkpointing.resolve_resume, after rank 0 fetched from the remote what it needs: a remote
    checkpoint newer than any local one (resume auto/latest with remote_sync), or a resume URL."""
    resume = config.resume
    if resume is not None and "://" in resume:
        return Path(_on_main(world, lambda: str(_fetch_url(resume, output_dir))))
    if config.remote_sync and resume in ("auto", "latest"):
        _on_main(world, lambda: _fetch_newer(config.remote_sync, output_dir))
    return ckpt.resolve_resume(resume, output_dir)


def _fetch_newer(url: str, output_dir: Path) -> None:
    """Download the remote's newest complete checkpoint (and metrics.jsonl) when it is newer than the local one."""
    local = ckpt.latest_checkpoint(output_dir)
    store = RemoteStore(url)
    try:
        found = store.latest_complete()
    except Exception as error:  # network, credentials: the library's own exception types
        if local is not None:
            warnings.warn(f"remote_sync '{shorten(url, 100)}' cannot be listed ({reason(error)}); resuming from "
                          f"the local checkpoint {local.name}, which may be older than the remote copy")
            return
        raise CheckpointError(f"remote_sync '{shorten(url, 100)}' cannot be listed to look for a checkpoint to "
                              f"resume from ({reason(error)}); check the URL and credentials, or set resume = "
                              "\"none\" to start a new run") from None
    if found is None or found.step <= _step_of(local):
        return
    checkpoints = ckpt.checkpoint_dir(output_dir)
    try:
        path = store.download(step_name(found.step), dict(found.files), checkpoints)
        _fetch_metrics(store, output_dir)
    except Exception as error:
        raise CheckpointError(f"downloading step {found.step} from remote_sync '{shorten(url, 100)}' failed "
                              f"({reason(error)}); check the network and rerun") from None
    say(f"resuming from the remote copy: downloaded {path.name} (step {found.step}) from '{shorten(url, 100)}' "
        f"into {checkpoints}")


def _fetch_metrics(store: RemoteStore, output_dir: Path) -> None:
    """The remote metrics.jsonl goes with the remote checkpoint (the loop drops rows after its step)."""
    remote = store.path("metrics.jsonl")
    if store.fs.exists(remote):
        atomic_write(output_dir / "metrics.jsonl", lambda tmp: store.fs.get_file(remote, str(tmp)))


def _fetch_url(url: str, output_dir: Path) -> Path:
    """resume = "<URL of a .pt>": download it (and its .dcp/ shards) into output_dir/checkpoints."""
    store, name = RemoteStore.around(url, "resume")
    if not name.endswith(".pt"):
        raise CheckpointError(f"resume URL '{shorten(url, 100)}' does not name a .pt training checkpoint; give "
                              "the URL of a step_N.pt file, or use resume = \"auto\" with remote_sync")
    stem = name[:-3]
    try:
        files: dict[str, int | None] = {name: store.fs.size(store.path(name))}
        match = _STEP.fullmatch(name)
        manifest = store.manifest(int(match.group(1))) if match else None
        if manifest is not None:
            if not store.is_complete(manifest):
                raise CheckpointError(f"remote checkpoint '{shorten(url, 100)}' is incomplete (its files do not "
                                      "match its manifest: an upload was cut short); resume from an earlier one")
            files = dict(manifest)
        else:  # not written by remote_sync: the .pt's CRCs are checked when it is loaded
            files.update(store.shards(stem))
        path = store.download(stem, files, ckpt.checkpoint_dir(output_dir))
    except FileNotFoundError:
        raise CheckpointError(f"resume checkpoint '{shorten(url, 100)}' does not exist; check the URL or use "
                              "resume = \"latest\"") from None
    except ClipforgeError:
        raise
    except Exception as error:
        raise CheckpointError(f"downloading resume checkpoint '{shorten(url, 100)}' failed ({reason(error)}); "
                              "check the URL and the network and rerun") from None
    say(f"resuming from the remote copy {shorten(url, 100)}: downloaded into {path}")
    return path


# ---- sync ----
class RemoteSync:
    """Copies each saved checkpoint and the run files to remote_sync; does nothing when it is unset or on
    ranks other than 0. Call ``upload(step)`` after every save (all ranks, after the barrier) and
    ``finish()`` at the end of the run."""

    def __init__(self, store: RemoteStore | None, output_dir: Path, keep_last: int) -> None:
        self.store, self.output_dir, self.keep_last = store, output_dir, keep_last
        self._thread: threading.Thread | None = None
        self._step: int | None = None

    @classmethod
    def for_run(cls, config: TrainConfig, output_dir: Path, world: World, start_step: int) -> RemoteSync:
        """Open remote_sync on rank 0; a remote holding a later checkpoint than this run starts from is refused
        (its pruning would delete this run's uploads as older)."""
        made: list[RemoteSync] = [cls(None, output_dir, config.keep_last)]
        if not config.remote_sync:
            return made[0]

        def open_store() -> None:  # rank 0; what other ranks get back is only whether it refused
            store = RemoteStore(str(config.remote_sync))
            url = shorten(str(config.remote_sync), 100)
            if store.read_only:
                say(f"remote_sync '{url}' is a read-only (http) mirror: resuming from it works, uploads are off")
                return
            try:
                found = store.latest_complete()
            except Exception as error:  # noqa: BLE001 (network, credentials: warn, and each save tries again)
                warnings.warn(f"remote_sync '{url}' cannot be listed now ({reason(error)}); training goes on and "
                              "each checkpoint save tries to copy again")
                found = None
            if found is not None and found.step > start_step:
                raise CheckpointError(f"remote_sync '{url}' holds a later checkpoint (step {found.step}) than this "
                                      f"run starts from (step {start_step}); use resume = \"auto\", choose another "
                                      "remote_sync URL, or delete the later remote checkpoints")
            made[0] = cls(store, output_dir, config.keep_last)

        _on_main(world, open_store)
        return made[0]

    def wait(self) -> None:
        """Block until the copy in flight (if any) is done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def upload(self, step: int) -> None:
        """Start copying checkpoint step and the run files; waits first for the previous copy."""
        if self.store is None:
            return
        self.wait()
        try:
            checkpoint = local_files(ckpt.checkpoint_dir(self.output_dir), step)
        except OSError as error:
            self._warn(step, error)
            return
        run_files = self._open_run_files()
        self._step = step
        self._thread = threading.Thread(target=self._copy, args=(step, checkpoint, run_files),
                                        name="clipforge-remote-sync")  # not a daemon: exit waits for the copy
        self._thread.start()

    def finish(self) -> None:
        """At the end of the run: wait for the last copy, then copy the final run files (the plot)."""
        if self.store is None:
            return
        if self._thread is not None and self._thread.is_alive():
            say(f"waiting for the copy of step {self._step} to remote_sync '{shorten(self.store.url, 100)}'")
        self.wait()
        run_files = self._open_run_files()
        try:
            self.store.upload_files(run_files)
        except Exception as error:
            warnings.warn(f"remote_sync: copying the run files to '{shorten(self.store.url, 100)}' failed "
                          f"({reason(error)}); they are intact in {self.output_dir}")
        finally:
            close_all(run_files)

    def _open_run_files(self) -> list[tuple[str, IO[bytes], int]]:
        paths = [self.output_dir / name for name in RUN_FILES]
        board = self.output_dir / "tensorboard"
        if board.is_dir():
            paths += sorted(p for p in board.rglob("*") if p.is_file())
        opened = []
        for path in paths:
            try:
                handle = open(path, "rb")
            except OSError:  # not written (yet): nothing to copy
                continue
            size = os.fstat(handle.fileno()).st_size  # what is there now: a later append is the next copy's
            opened.append((path.relative_to(self.output_dir).as_posix(), handle, size))
        return opened

    def _copy(self, step: int, checkpoint: list[tuple[str, IO[bytes], int]],
              run_files: list[tuple[str, IO[bytes], int]]) -> None:
        """The thread: checkpoint files, manifest, remote pruning, run files. Never raises: warns."""
        assert self.store is not None
        try:
            self.store.upload_checkpoint(step, checkpoint)
            self.store.prune(self.keep_last, keep_step=step)
            self.store.upload_files(run_files)
        except Exception as error:  # noqa: BLE001 (a failed copy must never stop training)
            self._warn(step, error)
        finally:
            close_all(checkpoint)
            close_all(run_files)

    def _warn(self, step: int, error: BaseException) -> None:
        url = shorten(self.store.url if self.store else "", 100)
        warnings.warn(f"remote_sync: copying step {step} to '{url}' failed ({reason(error)}); the local checkpoint "
                      "is intact and the next save copies again")
