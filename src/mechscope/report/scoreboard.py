"""scoreboard.json, schema version 2 (see the bench spec): build, write atomically, load.

Every row has a ``kind``: ``check`` (the program is right; a failure is a bug), ``finding``
(a claim about a network; ``passed`` says whether it was reproduced) or ``info`` (no
criterion: ``threshold`` and ``passed`` are null). Accuracies and IIA carry ``n`` and
``ci95`` in ``detail``; an amended criterion keeps the original in ``detail.amended_from``
(``{"threshold", "reason", "date"}``) and ``detail.registered_after_observation`` is true
where the value was known when the criterion was written. ``source`` names where a
threshold comes from and ``known_cause`` what is known about a finding that may not
reproduce. The top level also says which ``suite`` ran (``default`` or ``real``) and lists
under ``models`` the record of every real model the checks used (weights SHA-256, library
versions, dtype). Schema 1 files (no ``kind``) are read too: a row with a threshold is taken as
a check, one without as info.

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

SCHEMA = 2
READABLE = (1, 2)
KINDS = ("check", "finding", "info")
ROW_KEYS = ("task", "method", "metric", "value", "threshold", "passed", "baselines", "seconds", "detail")
TOP_KEYS = ("schema", "mechscope", "torch", "device", "seed", "started", "seconds", "rows")


class ScoreboardError(ValueError):
    """A scoreboard file is missing, unreadable, or not of a schema version this mechscope reads."""


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
    if not isinstance(data, dict) or data.get("schema") not in READABLE:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ScoreboardError(f"{path} has schema {found!r}; this mechscope reads schema "
                              f"{' or '.join(map(str, READABLE))}")
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise ScoreboardError(f"{path} lacks required key(s) {', '.join(missing)}")
    if not isinstance(data["rows"], list):
        raise ScoreboardError(f"{path}: 'rows' must be a list, got {type(data['rows']).__name__}")
    if not _number(data["seconds"]):
        raise ScoreboardError(f"{path}: 'seconds' must be a number, got {json.dumps(data['seconds'])[:40]}")
    for i, row in enumerate(data["rows"]):
        lacking = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else list(ROW_KEYS)
        if lacking:
            raise ScoreboardError(f"{path}: row {i} lacks key(s) {', '.join(lacking)}")
        if row.setdefault("kind", row_kind(row)) not in KINDS:
            raise ScoreboardError(f"{path}: row {i} has kind {row['kind']!r}; expected one of {', '.join(KINDS)}")
        wrong = wrong_types(row)
        if wrong:
            raise ScoreboardError(f"{path}: row {i} has field(s) {', '.join(wrong)} of the wrong type; the file was "
                                  "edited or damaged: write it again with `mechscope bench`")
    check_figures(data.get("figures", []), path.parent, str(path))
    return data


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _threshold_ok(t: Any) -> bool:
    return t is None or (isinstance(t, dict) and t.get("op") in (">=", "<=", ">", "<", "==") and _number(t.get("value")))


def wrong_types(row: dict[str, Any]) -> list[str]:
    """The fields of a row whose type is not the one the schema gives them (the readers, the
    tallies and the report, rely on these)."""
    wrong = [k for k in ("task", "method", "metric") if not isinstance(row[k], str)]
    wrong += [k for k in ("baselines", "detail") if not isinstance(row[k], dict)]
    wrong += [] if _number(row["seconds"]) else ["seconds"]
    wrong += [] if row["value"] is None or _number(row["value"]) else ["value"]
    wrong += [] if row["passed"] is None or isinstance(row["passed"], bool) else ["passed"]
    wrong += [] if _threshold_ok(row["threshold"]) else ["threshold"]
    wrong += [k for k in ("error", "known_cause", "source") if k in row and row[k] is not None
              and not isinstance(row[k], str)]
    detail = row["detail"] if isinstance(row["detail"], dict) else {}
    ci = detail.get("ci95")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(_number(v) for v in ci)):
        wrong.append("detail.ci95")
    was = detail.get("amended_from")
    if was is not None and not (isinstance(was, dict) and _threshold_ok(was.get("threshold"))):
        wrong.append("detail.amended_from")
    return wrong


def check_figures(figures: Any, base_dir: Path, where: str) -> None:
    """Figure entries are objects with task, method and name, and a ``path`` inside ``base_dir``
    (or a ``missing`` note); a path leading outside it is refused, naming the entry."""
    if not isinstance(figures, list):
        raise ScoreboardError(f"{where}: 'figures' must be a list, got {type(figures).__name__}")
    for i, fig in enumerate(figures):
        if not isinstance(fig, dict) or not all(isinstance(fig.get(k), str) for k in ("task", "method", "name")):
            raise ScoreboardError(f"{where}: figure {i} must be an object with string task, method and name "
                                  f"(and a path), got {json.dumps(fig)[:80]}")
        bad = [k for k in ("caption", "missing") if fig.get(k) is not None and not isinstance(fig[k], str)]
        if bad:
            raise ScoreboardError(f"{where}: figure {i} has {', '.join(bad)} of the wrong type (a string is expected)")
        if fig.get("missing"):
            continue
        try:
            confined(base_dir, fig.get("path"), f"{where}: figure {i} ({fig['name']})")
        except PathError as e:
            raise ScoreboardError(str(e)) from None


def row_kind(row: dict[str, Any]) -> str:
    """A row's kind; schema 1 rows have none: a criterion made them checks."""
    return row.get("kind") or ("info" if row.get("threshold") is None else "check")


def tally(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Counts by kind: checks passed/failed, findings reproduced/not, info, and rows that raised.

    A row that raised counts only under ``errors``, whatever its kind. ``passed`` and
    ``failed`` count every row with a verdict, as schema 1 did.
    """
    ok = [r for r in rows if not r.get("error")]
    of = lambda kind, verdict: sum(row_kind(r) == kind and r["passed"] is verdict for r in ok)  # noqa: E731
    return {
        "checks_passed": of("check", True), "checks_failed": of("check", False),
        "findings_reproduced": of("finding", True), "findings_not_reproduced": of("finding", False),
        "info": sum(r["passed"] is None for r in ok), "errors": len(rows) - len(ok),
        "passed": sum(r["passed"] is True for r in rows), "failed": sum(r["passed"] is False for r in rows),
    }


def tally_line(counts: dict[str, int]) -> str:
    """'checks 61/61 · findings 14/18 reproduced · 52 for information' (and errors, if any)."""
    checks = counts["checks_passed"] + counts["checks_failed"]
    findings = counts["findings_reproduced"] + counts["findings_not_reproduced"]
    line = (f"checks {counts['checks_passed']}/{checks} · findings {counts['findings_reproduced']}/{findings} "
            f"reproduced · {counts['info']} for information")
    return line + (f" · {counts['errors']} raised" if counts["errors"] else "")


def exit_status(rows: list[dict[str, Any]], *, fail: bool = True, strict: bool = False) -> int:
    """1 when a check failed or any row raised (``strict``: or a finding was not reproduced), else 0.

    ``fail`` off: always 0 (a complete run is all that is asked).
    """
    counts = tally(rows)
    bad = counts["checks_failed"] + counts["errors"] + (counts["findings_not_reproduced"] if strict else 0)
    return 1 if fail and bad else 0
