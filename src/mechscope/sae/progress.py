"""A one-line training progress bar on stderr: step, loss, L0, FVU, dead fraction, speed.

On a terminal the line is redrawn in place; elsewhere (logs, pipes) one line is printed
per update, without control characters.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressBar:
    """``update(step, metrics)`` after logged steps; ``close()`` at the end."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, start: int = 0,
                 width: int = 20) -> None:
        self.total, self.enabled, self.width = total, enabled, width
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.start = time.monotonic(), start
        self.drawn = False

    def line(self, step: int, m: dict[str, float]) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - step) / rate if rate > 0 else 0.0
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"sae [{bar}] {step}/{self.total} loss {m.get('loss', 0):.4g} L0 {m.get('l0', 0):.1f} "
                f"FVU {m.get('fvu', 0):.4f} dead {100 * m.get('dead', 0):.1f}% "
                f"{rate:.1f} step/s ETA {_eta(left)}")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = self.line(step, metrics)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
