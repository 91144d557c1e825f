"""The HTML report of a bench run (:mod:`.html`) and figure helpers (:mod:`.figures`).

``write_report(scoreboard, out_dir)`` and ``render_report(scoreboard, base_dir)`` are
loaded on first use; matplotlib is only imported when a figure is drawn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_report", "write_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mechscope.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'mechscope.report' has no attribute {name!r}")
