"""The bench's progress on stderr: which check runs, i/n, elapsed, estimated time left.

Every finished check prints one result line, ``[6/48] core/hooks/fixed_cost_ms: PASS ...``
(the bench's output contract). On a terminal the bottom line is a bar (:mod:`mechscope.core.progress`)
redrawn in place below them; elsewhere (CI logs, pipes) each check also prints a start line,
with no control characters.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TextIO

from mechscope.core.progress import Progress as _Bar
from mechscope.core.progress import bar_text as bar
from mechscope.core.progress import estimate_left, format_seconds

__all__ = ["Progress", "bar", "estimate_left", "format_seconds", "outcome_text"]

_BAR_FORMAT = "[{bar:20}] {index}/{total} {current}  {status}"


def outcome_text(rows: list[dict[str, Any]]) -> str:
    """``PASS iia 0.991 >= 0.95`` per row (a finding: ``reproduced`` / ``NOT reproduced``),
    joined; ``ERROR`` rows show their error."""
    parts = []
    for row in rows:
        if row.get("error"):
            error = row["error"] if len(row["error"]) <= 120 else row["error"][:117] + "..."
            parts.append(f"ERROR {row['metric']}: {error}")
            continue
        verdict = {True: "PASS", False: "FAIL", None: "info"}[row["passed"]]
        if row.get("kind") == "finding" and row["passed"] is not None:
            verdict = "reproduced" if row["passed"] else "NOT reproduced"
        criterion = row["threshold"]
        crit = f" {criterion['op']} {criterion['value']:g}" if criterion else ""
        parts.append(f"{verdict} {row['metric']} {row['value']:.4g}{crit}")
    return "; ".join(parts)


class Progress:
    """Progress display for ``total`` checks written to ``stream``."""

    def __init__(self, stream: TextIO, total: int, clock: Callable[[], float] = time.monotonic):
        self.stream, self.total = stream, total
        self.bar = _Bar(total, stream=stream, bar_format=_BAR_FORMAT, ascii="-#", leave=False, clock=clock)
        self.tty = self.bar.shows_bar
        self.done = 0
        self.current = ""

    def _status(self) -> str:
        left = estimate_left(self.bar.elapsed(), self.done, self.total)
        left_text = "?" if left is None else f"~{format_seconds(left)}"
        return f"elapsed {format_seconds(self.bar.elapsed())}, left {left_text}"

    def _draw(self) -> None:
        if self.tty and self.current:
            self.bar.update(self.done, index=self.done + 1, current=self.current, status=self._status())
        self.stream.flush()

    def begin(self, name: str) -> None:
        self.current = name
        if not self.tty:
            self.stream.write(f"[{self.done + 1}/{self.total}] {name} ...\n")
        self._draw()

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> None:
        self.bar.clear()
        self.done += 1
        self.stream.write(f"[{self.done}/{self.total}] {self.current}: {outcome_text(rows)} "
                          f"({format_seconds(seconds)}; {self._status()})\n")
        self.current = ""
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of text (a log message) above the bar."""
        self.bar.clear()
        self.stream.write(message.rstrip("\n") + "\n")
        self._draw()

    def close(self) -> None:
        self.bar.close()
