"""The HTML report of a bench run (:mod:`.html`), the scoreboard file it reads
(:mod:`.scoreboard`) and figure helpers (:mod:`.figures`).

``write_report(scoreboard, out_dir)`` and ``render_report(scoreboard, base_dir)``; matplotlib
is only imported when a figure is drawn.
"""

from __future__ import annotations

from mechscope.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
