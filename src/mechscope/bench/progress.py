"""Plain-text progress on stderr: which check runs, i/n, elapsed, estimated time left.

On a terminal the bottom line is a bar redrawn in place and every finished check leaves
one result line above it; elsewhere (CI logs, pipes) each check prints a start line and a
result line, with no control characters.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def estimate_left(elapsed: float, done: int, total: int) -> float | None:
    """Time left if the remaining checks take as long, on average, as the finished ones."""
    if done <= 0:
        return None
    return elapsed / done * (total - done)


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width if total <= 0 else int(width * done / total)
    return "#" * filled + "-" * (width - filled)


def outcome_text(rows: list[dict[str, Any]]) -> str:
    """``PASS iia 0.991 >= 0.95`` per row, joined; ``ERROR`` rows show their error."""
    parts = []
    for row in rows:
        if row.get("error"):
            error = row["error"] if len(row["error"]) <= 120 else row["error"][:117] + "..."
            parts.append(f"ERROR {row['metric']}: {error}")
            continue
        verdict = {True: "PASS", False: "FAIL", None: "info"}[row["passed"]]
        criterion = row["threshold"]
        crit = f" {criterion['op']} {criterion['value']:g}" if criterion else ""
        parts.append(f"{verdict} {row['metric']} {row['value']:.4g}{crit}")
    return "; ".join(parts)


class Progress:
    """Progress display for ``total`` checks written to ``stream``."""

    def __init__(self, stream: TextIO, total: int, clock: Callable[[], float] = time.monotonic):
        self.stream, self.total, self.clock = stream, total, clock
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start = clock()
        self.done = 0
        self.current = ""
        self._bar_shown = False

    def _status(self) -> str:
        elapsed = self.clock() - self.start
        left = estimate_left(elapsed, self.done, self.total)
        left_text = "?" if left is None else f"~{format_seconds(left)}"
        return f"elapsed {format_seconds(elapsed)}, left {left_text}"

    def _clear(self) -> None:
        if self.tty and self._bar_shown:
            self.stream.write("\r\x1b[2K")
            self._bar_shown = False

    def _draw(self) -> None:
        if self.tty and self.current:
            line = f"[{bar(self.done, self.total)}] {self.done + 1}/{self.total} {self.current}  " \
                   f"{self._status()}"
            self.stream.write(line[:160])
            self._bar_shown = True
        self.stream.flush()

    def begin(self, name: str) -> None:
        self.current = name
        if self.tty:
            self._clear()
        else:
            self.stream.write(f"[{self.done + 1}/{self.total}] {name} ...\n")
        self._draw()

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> None:
        self._clear()
        self.done += 1
        self.stream.write(f"[{self.done}/{self.total}] {self.current}: {outcome_text(rows)} "
                          f"({format_seconds(seconds)}; {self._status()})\n")
        self.current = ""
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of text (a log message) above the bar."""
        self._clear()
        self.stream.write(message.rstrip("\n") + "\n")
        self._draw()

    def close(self) -> None:
        self._clear()
        self.stream.flush()
