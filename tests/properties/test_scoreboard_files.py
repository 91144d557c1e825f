"""scoreboard.json damaged: ``load_scoreboard`` gives a ScoreboardError, or a scoreboard
that what reads it next (the tallies, the exit status, the HTML report) can use without
any other exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from damage import byte_damage, examples, json_damage, load_or_typed_error
from hypothesis import given

from mechscope.report.html import render_report
from mechscope.report.scoreboard import exit_status, load_scoreboard, tally

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 8


def row(kind, metric, value, threshold, passed, **extra):
    return {"task": "hier_eq", "method": "das", "metric": metric, "kind": kind, "value": value,
            "threshold": threshold, "passed": passed, "baselines": {"random_subspace": 0.5}, "seconds": 1.5,
            "detail": {"n": 200, "ci95": [0.9, 0.99]}, **extra}


BOARD = {
    "schema": 2, "mechscope": "0.1.0", "torch": "2.13.0", "device": "cpu", "seed": 0,
    "started": "2026-11-24T10:00:00Z", "seconds": 12.5, "threads": 1, "complete": True,
    "rows": [row("check", "iia", 0.99, {"op": ">=", "value": 0.95}, True),
             row("finding", "acc", 0.4, {"op": ">=", "value": 0.9}, False, source="paper", known_cause="seed"),
             row("info", "l0", 12, None, None),
             row("check", "mse", None, {"op": "<=", "value": 0.1}, False, error="ValueError: bad input")],
    "figures": [{"task": "hier_eq", "method": "das", "name": "iia", "caption": "IIA", "path": "figures/iia.png"},
                {"task": "hier_eq", "method": "das", "name": "geom", "caption": "", "missing": "no matplotlib"}],
}


def read_and_use(path: Path) -> None:
    board = load_scoreboard(path)
    tally(board["rows"]), exit_status(board["rows"], strict=True)
    render_report(board, path.parent)


def check(raw: bytes, what: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "figures").mkdir()
        (directory / "figures" / "iia.png").write_bytes(PNG)
        (directory / "scoreboard.json").write_bytes(raw)
        load_or_typed_error(lambda: read_and_use(directory / "scoreboard.json"), what)


def test_the_undamaged_scoreboard_reads_and_renders(tmp_path):
    check(json.dumps(BOARD).encode(), "undamaged")


@examples(150)
@given(damage=json_damage(BOARD))
def test_a_damaged_scoreboard_is_an_error_or_usable(damage):
    what, doc = damage
    check(json.dumps(doc).encode(), what)


@examples(60)
@given(damage=byte_damage(json.dumps(BOARD, indent=1).encode()))
def test_scoreboard_bytes_damaged_are_an_error_or_usable(damage):
    check(damage[1], damage[0])
