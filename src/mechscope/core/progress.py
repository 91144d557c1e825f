"""Progress of a long job (SAE and SPD training, the bench), on stderr, built on tqdm.

- Where someone watches, a tqdm bar redrawn in place: on a terminal (the stream's
  ``isatty()``) or when asked (``bar=True``); in a Jupyter notebook, tqdm.auto's widget.
- Elsewhere (logs, CI, pipes), or with ``bar=False``, one plain line per update without
  control characters, formatted as tqdm formats its meter:
  ``sae:  50% 50/100 [00:10<00:10, 4.90it/s, loss 0.25 L0 31.5]``.
- Nothing at all when disabled (``progress=False``, ranks other than 0).

tqdm's monitor thread is off: nothing runs in the background. A terminal bar is erased
(``ESC[2K``) rather than overwritten with spaces, so a line written above it
(:meth:`Progress.write`) is printed clean.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO


def format_seconds(seconds: float) -> str:
    """``5s``, ``1m01s``, ``1h01m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def estimate_left(elapsed: float, done: int, total: int) -> float | None:
    """Time left if the remaining units take as long, on average, as the finished ones."""
    if done <= 0:
        return None
    return elapsed / done * (total - done)


def bar_text(done: int, total: int, width: int = 20) -> str:
    """tqdm's ASCII bar without a frame: ``#`` done, ``-`` to do (full when ``total <= 0``)."""
    from tqdm.std import Bar

    return format(Bar(1.0 if total <= 0 else done / total, width, charset="-#"))


def is_terminal(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def in_notebook() -> bool:
    """Whether tqdm.auto would draw a notebook widget (running in a Jupyter kernel)."""
    from tqdm import auto

    return any(c.__module__ == "tqdm.notebook" for c in auto.tqdm.__mro__)


def _bar_class(notebook: bool) -> type:
    """tqdm's class for a bar (tqdm.auto's in a notebook) with the extra format fields and no
    monitor thread; on a terminal, drawn as one erasable line."""
    from tqdm import auto
    from tqdm.std import tqdm as std_tqdm

    class Bar(auto.tqdm if notebook else std_tqdm):
        monitor_interval = 0  # no background thread
        fields: dict[str, Any] = {}

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, **self.fields}

        if not notebook:
            _shown = False

            def display(self, msg: str | None = None, pos: int | None = None) -> bool:
                if not hasattr(self, "start_t"):  # the constructor's draw: the caller's own comes next
                    return False
                self.clear()
                self.fp.write(self.__str__() if msg is None else msg)
                self.fp.flush()
                self._shown = True
                return True

            def clear(self, nolock: bool = False) -> None:
                if self._shown:
                    self.fp.write("\r\x1b[2K")
                    self._shown = False

    return Bar


class Progress:
    """``update(step, text)`` after some units of work, ``write(line)`` for a message,
    ``close()`` at the end.

    ``start`` is where the work starts (a resumed run); speed and time left count from it.
    ``bar_format`` is tqdm's (``None``: its standard bar) and may name extra fields given
    to :meth:`update`; ``ascii`` is tqdm's bar charset.
    """

    def __init__(self, total: int, *, label: str = "", stream: TextIO | None = None, enabled: bool = True,
                 bar: bool | None = None, start: int = 0, bar_format: str | None = None, ascii: Any = None,
                 leave: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.enabled, self.start = total, label, enabled, start
        self.stream = stream if stream is not None else sys.stderr
        self.notebook = enabled and self.stream is sys.stderr and bar is not False and in_notebook()
        self.shows_bar = enabled and (self.notebook or (bar if bar is not None else is_terminal(self.stream)))
        self.clock, self.t0 = clock, clock()
        self._options = {"bar_format": bar_format, "ascii": ascii, "leave": leave}
        self._bar: Any = None

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def line(self, step: int, text: str = "") -> str:
        """The plain line for ``step``: tqdm's meter without the bar."""
        from tqdm.std import tqdm as std_tqdm

        return std_tqdm.format_meter(step, self.total, self.elapsed(), ncols=0, prefix=self.label,
                                     postfix=text or None, initial=self.start)

    def update(self, step: int, text: str = "", **fields: Any) -> None:
        """Show progress at ``step``: the bar (with ``text`` after the meter and ``fields`` for
        its format), or else a plain line."""
        if not self.enabled:
            return
        if not self.shows_bar:
            self.stream.write(self.line(step, text) + "\n")
            self.stream.flush()
            return
        bar = self._open(fields)
        bar.fields = fields
        bar.n = step
        bar.set_postfix_str(text, refresh=False)
        bar.refresh()

    def _open(self, fields: dict[str, Any]) -> Any:
        if self._bar is None:
            cls = _bar_class(self.notebook)
            cls.fields = fields  # the first draw, inside the constructor, formats them
            self._bar = cls(total=self.total, initial=self.start, desc=self.label or None, file=self.stream,
                            smoothing=0, mininterval=0, disable=False, **self._options)
            self._bar._time = self.clock  # one clock for the bar's speed and the caller's
            self._bar.start_t = self.t0
            self._bar.last_print_t = self.clock()
        return self._bar

    def clear(self) -> None:
        """Erase the bar (the next update draws it again)."""
        if self._bar is not None:
            self._bar.clear()

    def write(self, text: str) -> None:
        """A line of text above the bar (or a plain line)."""
        if not self.enabled:
            return
        self.clear()
        self.stream.write(text.rstrip("\n") + "\n")
        if self._bar is not None:
            self._bar.refresh()
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            self.stream.flush()
