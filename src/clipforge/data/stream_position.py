"""Where one rank's WebDataset stream stands after a batch: a small plain dict that a checkpoint stores.

Each logical loader worker's stream is deterministic (its shards, its seeded shuffle buffer, its
crops), so "worker ``w`` has taken ``consumed[w]`` raw samples from its shuffle buffer in this pass"
pins it down. torch's DataLoader yields from an IterableDataset round robin over its workers in order,
skipping those that are done, so the batch order is pinned by which logical worker yields next.
Workers only know their own counts; ``StreamState`` is the main process's merge of their reports.

The dict (``Batch.position``; every value an int, bool, str or list of them)::

    {"version": 1, "epoch": 0, "step": 5,            # batches of this epoch before the next one
     "pass": 0, "rank": 0, "world_size": 2, "num_workers": 3,   # num_workers: logical streams (>= 1)
     "resampled": False, "stream": "9f...",          # fingerprint: shards, weights, seed, batch size
     "consumed": [24, 16, 16], "done": [False, False, False], "next": 2}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERSION = 1


@dataclass
class StreamState:
    """The merged state of one rank's logical workers within one pass."""

    workers: int
    pass_index: int = 0
    consumed: list[int] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    next: int = 0  # the logical worker whose batch comes next (round robin, done ones skipped)

    def __post_init__(self) -> None:
        self.consumed = self.consumed or [0] * self.workers
        self.done = self.done or [False] * self.workers

    @classmethod
    def approximate(cls, workers: int, start_step: int, batch_size: int) -> StreamState:
        """The state after ``start_step`` batches if no sample was bad and no worker ran dry (old resume)."""
        consumed = [len(range(w, start_step, workers)) * batch_size for w in range(workers)]
        return cls(workers, 0, consumed, [], start_step % workers)

    def fresh(self) -> bool:
        return not any(self.consumed) and not any(self.done)

    def report(self, worker: int, consumed: int, done: bool = False) -> None:
        """A worker's batch (or its end): its count, and the round robin moves past it."""
        self.consumed[worker] = consumed
        self.done[worker] = self.done[worker] or done
        self.next = (worker + 1) % self.workers

    def copy(self) -> StreamState:
        return StreamState(self.workers, self.pass_index, list(self.consumed), list(self.done), self.next)

    def next_pass(self) -> StreamState:
        return StreamState(self.workers, self.pass_index + 1)

    def to_position(self, *, epoch: int, step: int, rank: int, world_size: int, resampled: bool,
                    stream: str) -> dict[str, Any]:
        return {"version": VERSION, "epoch": epoch, "step": step, "pass": self.pass_index, "rank": rank,
                "world_size": world_size, "num_workers": self.workers, "resampled": resampled, "stream": stream,
                "consumed": list(self.consumed), "done": list(self.done), "next": self.next}

    @classmethod
    def from_position(cls, position: dict[str, Any], **expected: Any) -> StreamState | str:
        """The state a position describes, or why it does not fit this run (``expected``: the keys that must match)."""
        if not isinstance(position, dict) or position.get("version") != VERSION:
            return f"it is not a version-{VERSION} WebDataset position"
        for key, value in expected.items():
            if position.get(key) != value:
                return f"it was saved with {key}={position.get(key)!r} but this run has {key}={value!r}"
        workers = int(expected.get("num_workers", position["num_workers"]))
        try:
            consumed = [int(c) for c in position["consumed"]]
            done = [bool(d) for d in position["done"]]
            state = cls(workers, int(position["pass"]), consumed, done, int(position["next"]) % workers)
        except (KeyError, TypeError, ValueError):
            return "its fields are damaged"
        if len(consumed) != workers or len(done) != workers or min(consumed, default=0) < 0:
            return "its worker counts do not match num_workers"
        return state
