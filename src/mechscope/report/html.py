"""report.html: one self-contained page from a scoreboard and its figure files.

The first screen gives both tallies (checks passed, findings reproduced) and the findings
table: every finding with its measurement, interval, criterion and, for one not
reproduced, its known cause. Then the summary table of every row (kind, value, criterion,
verdict, baselines; rows sharing a metric are told apart by the detail that differs),
then one section per task with its figures (PNG embedded as base64) and its rows with
their details. Every criterion is printed with the value found and the verdict; an
amended one with the criterion it replaced.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from mechscope.core.atomic import atomic_write
from mechscope.core.paths import confined
from mechscope.report.scoreboard import check_figures, row_kind, tally, tally_line

OP_TEXT = {">=": "≥", "<=": "≤", ">": "&gt;", "<": "&lt;", "==": "="}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;
 padding:0 1em;color:#1d232a}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ccd;padding-bottom:.2em}
.meta{color:#556;margin-bottom:1em} .totals{font-size:1.1em;margin:.8em 0}
table{border-collapse:collapse;width:100%;margin:.6em 0} th,td{border:1px solid #d6dae0;
 padding:.3em .55em;text-align:left;vertical-align:top} th{background:#f1f3f6}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.pass td.verdict{background:#d9f2dd;color:#145a21;font-weight:600}
tr.fail td.verdict{background:#f8d7d7;color:#8a1414;font-weight:600}
tr.info td.verdict{background:#eceff3;color:#445}
tr.notrep td.verdict{background:#fff0c2;color:#6a4a00;font-weight:600}
.kind{font-size:.85em;color:#445;text-transform:uppercase;letter-spacing:.03em}
.banner{padding:.6em 1em;border-radius:4px;margin:1em 0}
.banner.bad{background:#f8d7d7} .banner.note{background:#fff4d6}
pre.error{white-space:pre-wrap;background:#fbeeee;padding:.5em;margin:.3em 0;font-size:12px}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
details.attached iframe{width:100%;height:640px;border:1px solid #e3e6ea}
figure img{max-width:560px;border:1px solid #e3e6ea} figcaption{color:#445;font-size:.9em;max-width:560px}
.detail{color:#334;font-size:.92em} .muted{color:#889}
"""


def fmt(x: Any) -> str:
    """A value as the report prints it: 4 significant digits, '—' for none."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return escape(str(x))
    return str(x) if isinstance(x, int) else f"{x:.4g}"


def criterion(threshold: dict[str, Any] | None, detail: dict[str, Any] | None = None) -> str:
    text = "none (reported for information)" if not threshold else \
        f"{OP_TEXT.get(threshold['op'], escape(threshold['op']))} {fmt(threshold['value'])}"
    was = (detail or {}).get("amended_from")
    if isinstance(was, dict):
        text += f'<br><span class="muted">amended {escape(str(was.get("date")))} from ' \
                f'{criterion(was.get("threshold"))}</span>'
    return text


def verdict(row: dict[str, Any]) -> tuple[str, str]:
    """(css class, text) for a row: a finding is reproduced or not, a check passes or fails."""
    if row.get("error"):
        return "fail", "ERROR"
    if row_kind(row) == "finding" and row["passed"] is not None:
        return ("pass", "reproduced") if row["passed"] else ("notrep", "not reproduced")
    return {True: ("pass", "PASS"), False: ("fail", "FAIL"), None: ("info", "info")}[row["passed"]]


def value_text(row: dict[str, Any]) -> str:
    """The value, with its 95 % interval and n where the row has them."""
    detail = row.get("detail") or {}
    ci = detail.get("ci95")
    text = fmt(row["value"])
    if isinstance(ci, list) and len(ci) == 2:
        text += f'<br><span class="muted">[{fmt(ci[0])}, {fmt(ci[1])}]</span>'
    if isinstance(detail.get("n"), int):
        text += f'<br><span class="muted">n={detail["n"]}</span>'
    return text


def baselines_text(baselines: dict[str, Any]) -> str:
    return ", ".join(f"{escape(k)} {fmt(v)}" for k, v in baselines.items()) or '<span class="muted">—</span>'


def _short(value: Any) -> str:
    """Detail values for reading: floats to 4 significant digits, containers recursively."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [_short(v) for v in value[:12]]
        return "[" + ", ".join(items) + (", ..." if len(value) > 12 else "") + "]"
    return str(value)


def detail_text(detail: dict[str, Any]) -> str:
    shown = {k: v for k, v in detail.items() if k != "traceback"}
    return ", ".join(f"{escape(str(k))}={escape(_short(v))}" for k, v in shown.items())


def task_anchor(task: str) -> str:
    return f"task-{escape(task)}"


def distinguishing(rows: list[dict[str, Any]]) -> list[str]:
    """For each row, the detail values that tell it from rows of the same task, method and
    metric (e.g. ``variable=WX``); empty where the metric is reported once."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["task"], r["method"], r["metric"]), []).append(i)
    out = [""] * len(rows)
    for members in groups.values():
        if len(members) < 2:
            continue
        details = [rows[i].get("detail") or {} for i in members]
        keys = [k for k in details[0] if all(isinstance(d.get(k), (str, int, float)) for d in details)
                and len({str(d.get(k)) for d in details}) > 1]
        for i, d in zip(members, details):
            out[i] = ", ".join(f"{k}={_short(d[k])}" for k in keys[:2])
    return out


def _row_html(row: dict[str, Any], *, with_task: bool, which: str = "") -> str:
    css, text = verdict(row)
    task = f'<td><a href="#{task_anchor(row["task"])}">{escape(row["task"])}</a></td>' if with_task else ""
    extra = f'<td class="detail">{detail_text(row["detail"])}</td>' if not with_task else ""
    error = f'<pre class="error">{escape(row["error"])}</pre>' if row.get("error") else ""
    metric = escape(row["metric"]) + (f' <span class="muted">({escape(which)})</span>' if which else "")
    return (f'<tr class="{css}">{task}<td>{escape(row["method"])}</td><td>{metric}</td>'
            f'<td class="kind">{row_kind(row)}</td>'
            f'<td class="num">{value_text(row)}</td><td class="num">{criterion(row["threshold"], row["detail"])}</td>'
            f'<td class="verdict">{text}</td><td>{baselines_text(row["baselines"])}</td>{extra}'
            f'<td class="num">{fmt(round(row["seconds"], 1))}s</td></tr>'
            + (f'<tr class="{css}"><td colspan="9">{error}</td></tr>' if error else ""))


def rows_table(rows: list[dict[str, Any]], *, with_task: bool) -> str:
    head = ["Task"] if with_task else []
    head += ["Method", "Metric", "Kind", "Value", "Criterion", "Result", "Baselines"]
    head += [] if with_task else ["Detail"]
    head += ["Time"]
    cells = "".join(f"<th>{h}</th>" for h in head)
    which = distinguishing(rows)
    body = "".join(_row_html(r, with_task=with_task, which=w) for r, w in zip(rows, which))
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def findings_table(rows: list[dict[str, Any]]) -> str:
    """Every finding: what was measured, against what, and why one may not have reproduced."""
    found = [(r, w) for r, w in zip(rows, distinguishing(rows)) if row_kind(r) == "finding"]
    if not found:
        return ""
    found.sort(key=lambda rw: rw[0]["passed"] is True)  # not reproduced first
    body = []
    for r, w in found:
        css, text = verdict(r)
        name = f'{escape(r["task"])}/{escape(r["method"])}/{escape(r["metric"])}' + (f" ({escape(w)})" if w else "")
        cause = "" if r["passed"] else escape(r.get("error") or r.get("known_cause") or "no known cause recorded")
        body.append(f'<tr class="{css}"><td><a href="#{task_anchor(r["task"])}">{name}</a></td>'
                    f'<td class="num">{value_text(r)}</td><td class="num">{criterion(r["threshold"], r["detail"])}</td>'
                    f'<td class="verdict">{text}</td><td>{cause}</td><td class="detail">{escape(r.get("source") or "")}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("Finding", "Measured", "Criterion", "Result", "Known cause", "Source"))
    return f"<h2>Findings</h2><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure_html(fig: dict[str, Any], base_dir: Path) -> str:
    """One figure, embedded; a note in its place when it is missing."""
    caption = escape(fig.get("caption") or fig["name"])
    if fig.get("missing"):
        return f'<div class="banner note">Figure {escape(fig["name"])}: {escape(fig["missing"])}</div>'
    path = confined(base_dir, fig.get("path"), f"figure {fig['name']!r} of the scoreboard")  # never read outside
    if not path.is_file():
        return f'<div class="banner note">Figure {escape(fig["name"])}: file {escape(str(path))} not found</div>'
    if path.suffix == ".html":  # an attached page: sandboxed (no scripts), collapsed until opened
        page = escape(path.read_text(encoding="utf-8"), quote=True)
        return (f'<details class="attached"><summary>{caption}</summary><iframe sandbox="" srcdoc="{page}" '
                f'title="{caption}"></iframe></details>')
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _tasks(board: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for item in board["rows"] + board.get("figures", []):
        seen.setdefault(item["task"], None)
    return list(seen)


def _header(board: dict[str, Any]) -> str:
    counts = tally(board["rows"])
    meta = (f"mechscope {escape(str(board['mechscope']))} · torch {escape(str(board['torch']))} · "
            f"device {escape(str(board['device']))} · threads {escape(str(board.get('threads', '?')))} · "
            f"seed {escape(str(board['seed']))} · started {escape(str(board['started']))} · "
            f"{fmt(round(board['seconds'], 1))} s")
    for b in board.get("cache_builds") or []:
        meta += f" (of which {escape(str(b.get('what')))} built: {fmt(b.get('seconds'))} s)"
    if isinstance(board.get("peak_rss_bytes"), int):
        meta += f" · peak memory {board['peak_rss_bytes'] / 2 ** 30:.2f} GiB"
    banner = "" if board.get("complete", True) else \
        '<div class="banner bad">This run did not finish: the rows below are those it completed.</div>'
    broken = [r for r in board["rows"] if r.get("error") or (row_kind(r) == "check" and r["passed"] is False)]
    if broken:
        names = ", ".join(f'<a href="#{task_anchor(r["task"])}">{escape(r["task"])}/{escape(r["method"])}/'
                          f'{escape(r["metric"])}</a>' for r in broken)
        banner += f'<div class="banner bad">Failed checks and rows that raised: {names}</div>'
    return (f'<h1>mechscope bench</h1><div class="meta">{meta}</div>{banner}'
            f'<div class="totals"><b>{escape(tally_line(counts))}</b></div>')


def render_report(board: dict[str, Any], base_dir: Path) -> str:
    """The report page for a scoreboard whose figure paths are relative to ``base_dir``."""
    figures = board.get("figures", [])
    check_figures(figures, Path(base_dir), "scoreboard")
    parts = [_header(board), findings_table(board["rows"]), "<h2>Summary</h2>",
             rows_table(board["rows"], with_task=True) if board["rows"] else "<p>No checks ran.</p>"]
    for task in _tasks(board):
        rows = [r for r in board["rows"] if r["task"] == task]
        figs = "".join(figure_html(f, Path(base_dir)) for f in figures if f["task"] == task)
        parts.append(f'<h2 id="{task_anchor(task)}">{escape(task)}</h2>{figs}'
                     + (rows_table(rows, with_task=False) if rows else ""))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mechscope bench'
            f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(board: dict[str, Any], out_dir: Path, name: str = "report.html") -> Path:
    """Render and write ``out_dir/name`` atomically; return its path."""
    path = Path(out_dir) / name
    atomic_write(path, render_report(board, Path(out_dir)))
    return path
