"""A one-line progress bar for SPD training: step, speed, time left, losses, live subcomponents.

On a terminal the line is redrawn in place; otherwise (logs, CI) one line is printed per
update. Nothing is printed on ranks other than 0 or when disabled.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO


def _short(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _clock(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``update(step, losses, live)`` after a step; ``close()`` at the end."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, label: str = "spd",
                 start_step: int = 0) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.start_step = time.perf_counter(), start_step
        self._drawn = False

    def line(self, step: int, losses: Mapping[str, float], live: Mapping[str, tuple[int, int]]) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - step) / rate if rate > 0 else 0.0
        pct = 100.0 * step / max(self.total, 1)
        loss_text = " ".join(f"{k} {_short(v)}" for k, v in losses.items())
        live_text = " ".join(f"{k} {n}/{c}" for k, (n, c) in live.items())
        return (f"{self.label} {step}/{self.total} {pct:3.0f}% {rate:.1f} it/s left {_clock(left)} | "
                f"{loss_text} | live {live_text}")

    def update(self, step: int, losses: Mapping[str, float], live: Mapping[str, tuple[int, int]]) -> None:
        if not self.enabled:
            return
        text = self.line(step, losses, live)
        if self.tty:
            self.stream.write("\r" + text[:200].ljust(120))
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self._drawn else "") + text + "\n")
            self._drawn = False
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def summarise(values: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of a step's outputs, for the progress line."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
