"""scoreboard.json, schema version 1 (see the bench spec): build, write atomically, load.

A row's ``seconds`` is the wall time of the check that produced it (rows of one check share
it); an errored row has ``"value": null``, ``"passed": false`` and an ``"error"`` string.

Beyond the keys of the spec, a scoreboard carries ``threads`` (torch intra-op threads the
run used), ``options`` (the BenchConfig it ran with), ``complete`` (false while the run is
going or after it was interrupted; the file is rewritten after every check) and
``figures``: one entry per figure a
check attached, ``{"task", "method", "name", "caption", "path"}`` with ``path`` relative to
the scoreboard's directory (``figures/<task>__<method>__<name>.png``), or ``"missing"``
instead of ``path`` when the figure could not be drawn. ``mechscope report`` embeds the
listed files, so a scoreboard and its ``figures/`` directory are all a report needs; a
figure ``path`` that leads outside the scoreboard's directory (``..``, an absolute path,
a link out) is an error naming the entry, never read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechscope.core.atomic import atomic_write
from mechscope.core.paths import PathError, confined

SCHEMA = 1
ROW_KEYS = ("task", "method", "metric", "value", "threshold", "passed", "baselines", "seconds", "detail")
TOP_KEYS = ("schema", "mechscope", "torch", "device", "seed", "started", "seconds", "rows")


class ScoreboardError(ValueError):
    """A scoreboard file is missing, unreadable, or not schema version 1."""


def write_scoreboard(path: Path, scoreboard: dict[str, Any]) -> None:
    """Write a scoreboard as JSON; NaN or infinity anywhere is a bug and raises ValueError."""
    atomic_write(path, json.dumps(scoreboard, indent=2, allow_nan=False) + "\n")


def load_scoreboard(path: Path) -> dict[str, Any]:
    """Read and check a scoreboard; errors say which file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ScoreboardError(f"no scoreboard at {path}; run `mechscope bench --out DIR` first "
                              f"or pass --scoreboard DIR/scoreboard.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoreboardError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ScoreboardError(f"{path} has schema {found!r}; this mechscope reads schema {SCHEMA}")
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise ScoreboardError(f"{path} lacks required key(s) {', '.join(missing)}")
    if not isinstance(data["rows"], list):
        raise ScoreboardError(f"{path}: 'rows' must be a list, got {type(data['rows']).__name__}")
    for i, row in enumerate(data["rows"]):
        lacking = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else list(ROW_KEYS)
        if lacking:
            raise ScoreboardError(f"{path}: row {i} lacks key(s) {', '.join(lacking)}")
    check_figures(data.get("figures", []), path.parent, str(path))
    return data


def check_figures(figures: Any, base_dir: Path, where: str) -> None:
    """Figure entries are objects with task, method and name, and a ``path`` inside ``base_dir``
    (or a ``missing`` note); a path leading outside it is refused, naming the entry."""
    if not isinstance(figures, list):
        raise ScoreboardError(f"{where}: 'figures' must be a list, got {type(figures).__name__}")
    for i, fig in enumerate(figures):
        if not isinstance(fig, dict) or not all(isinstance(fig.get(k), str) for k in ("task", "method", "name")):
            raise ScoreboardError(f"{where}: figure {i} must be an object with string task, method and name "
                                  f"(and a path), got {json.dumps(fig)[:80]}")
        if fig.get("missing"):
            continue
        try:
            confined(base_dir, fig.get("path"), f"{where}: figure {i} ({fig['name']})")
        except PathError as e:
            raise ScoreboardError(str(e)) from None


def tally(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of passed, failed (including errors) and informational rows."""
    return {
        "passed": sum(r["passed"] is True for r in rows),
        "failed": sum(r["passed"] is False for r in rows),
        "info": sum(r["passed"] is None for r in rows),
    }
