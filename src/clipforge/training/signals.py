"""SIGINT (Ctrl-C) and SIGTERM (what SLURM sends before preemption) stop a run at a step boundary.

The first signal only sets a flag: the loop finishes the step, saves a checkpoint and exits
with 128 + the signal number (130 / 143), so scripts see an unfinished run and a rerun resumes
exactly. A second signal means "now": the previous handler runs (KeyboardInterrupt or death).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from clipforge.training.distributed import World

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM ask for a stop instead of killing the process."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in HANDLED:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data worker inherited the handler: the main process decides
            return
        if self.received is not None:
            self._restore()
            signal.raise_signal(number)
            return
        self.received = number
        # os.write, not print: the handler may interrupt a print to the same stream.
        os.write(2, f"\nreceived {signal.Signals(number).name}: stopping after this step with a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_status(self) -> int:
        return 128 + self.received if self.received else 0

    def agreed(self, world: World, device: torch.device) -> bool:
        """Whether to stop now; with many processes, all stop at the same step if any one was signalled."""
        if not world.distributed:
            return self.received is not None
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())
