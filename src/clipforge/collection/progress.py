"""Progress of an embedding run: a tqdm bar on a terminal, one line per finished part otherwise.

Torch-free, shared by the torch pipeline (``pipeline``) and the onnxruntime one (``onnx_pipeline``).
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar in items/s when stdout is a terminal; otherwise one plain line per finished part."""

    def __init__(self, total: int, unit: str, enabled: bool, prefix: str = "") -> None:
        from tqdm import tqdm

        self.enabled, self.unit, self.prefix = enabled, unit, prefix
        self.bar = tqdm(total=total, unit=unit, desc=f"{prefix}embed", dynamic_ncols=True, file=sys.stdout,
                        smoothing=0.05) if enabled and total and sys.stdout.isatty() else None
        self.part_started = time.perf_counter()

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def say(self, line: str) -> None:
        """A line that must be seen (a note), above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def part_done(self, part: int, done: int, pending: int, items: int, rows: int, skipped: int) -> None:
        now = time.perf_counter()
        seconds, self.part_started = now - self.part_started, now
        if self.enabled and self.bar is None:
            rate = items / seconds if seconds > 0 else float("inf")
            extra = f", {skipped} skipped" if skipped else ""
            print(f"{self.prefix}part {part} ({done} of {pending}): {rows} of {items} {self.unit}s embedded{extra}, "
                  f"{rate:.1f} {self.unit}s/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
