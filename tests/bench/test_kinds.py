"""Kinds of rows (check, finding, info), amendments, intervals, tallies and the exit status."""

from __future__ import annotations

import pytest

from mechscope.bench import Criterion, Result, amended
from mechscope.bench.registry import Registry, RegistryError
from mechscope.bench.runner import summary
from mechscope.bench.scoring import rows_for
from mechscope.report.scoreboard import exit_status, tally, tally_line


def _noop(ctx):
    return 0.0


def _row(kind, passed, error=None):
    threshold = None if kind == "info" else {"op": ">=", "value": 0.5}
    row = {"task": "t", "method": "m", "metric": "x", "kind": kind, "value": 1.0, "threshold": threshold,
           "passed": passed, "baselines": {}, "seconds": 0.0, "detail": {}}
    return {**row, "error": error} if error else row


def test_a_threshold_without_a_kind_is_refused():
    with pytest.raises(RegistryError, match="has a threshold but no kind"):
        Registry().register("t", "m", "x", (">=", 0.5), run=_noop)
    with pytest.raises(RegistryError, match="needs a threshold"):
        Registry().register("t", "m", "x", None, kind="finding", run=_noop)
    with pytest.raises(RegistryError, match="not one of"):
        Registry().register("t", "m", "x", (">=", 0.5), kind="claim", run=_noop)


def test_other_metrics_inherit_the_kind_unless_they_say_their_own():
    chk = Registry().register("t", "m", "x", (">=", 0.5), kind="finding", source="a paper", run=_noop,
                              other_metrics={"same": ("<", 1), "shown": None, "exact": Criterion.check("==", 0)})
    kinds = {m: c.kind for m, c in chk.criteria.items()}
    assert kinds == {"x": "finding", "same": "finding", "shown": "info", "exact": "check"}
    assert chk.criteria["same"].source == "a paper" and chk.criteria["exact"].source == ""


def test_amendment_keeps_the_original_reason_and_date_in_the_row():
    chk = Registry().register("t", "m", "x", (">", 2.0), kind="finding", run=_noop, after_observation=True,
                              amended_from=amended((">", 3.0), "the period prior lets positions help", "2026-12-06"))
    (row,) = rows_for(chk, 2.5, 0.0)
    assert row["detail"]["amended_from"] == {"threshold": {"op": ">", "value": 3.0},
                                             "reason": "the period prior lets positions help", "date": "2026-12-06"}
    assert row["detail"]["registered_after_observation"] is True and row["passed"] is True
    with pytest.raises(RegistryError, match="YYYY-MM-DD"):
        amended((">", 3.0), "why", "6 Dec 2026")
    with pytest.raises(RegistryError, match="say why"):
        amended((">", 3.0), " ", "2026-12-06")


def test_an_info_row_may_record_the_criterion_it_lost():
    chk = Registry().register("t", "m", "ms", None, run=_noop, amended_from=amended(("<", 0.2), "timing", "2026-12-06"))
    (row,) = rows_for(chk, 0.3, 0.0)
    assert row["kind"] == "info" and row["passed"] is None and row["detail"]["amended_from"]["threshold"]["op"] == "<"


@pytest.mark.parametrize("op,interval,reproduced", [
    (">=", (0.951, 0.99), True), (">=", (0.94, 0.99), False),   # the interval must clear it, not the value
    ("<=", (0.5, 0.79), True), ("<=", (0.5, 0.81), False),
    ("==", (1.0, 1.0), True), ("==", (0.99, 1.0), False),
])
def test_a_finding_is_reproduced_only_when_its_interval_clears_the_threshold(op, interval, reproduced):
    value = {">=": 0.95, "<=": 0.8, "==": 1.0}[op]
    crit = Criterion.finding(op, value)
    assert crit.verdict(max(interval[0], min(value, interval[1])), interval) is reproduced


def test_a_check_is_judged_on_its_value():
    assert Criterion.check(">=", 0.95).verdict(0.96, (0.9, 0.99)) is True


def test_proportion_rows_carry_n_and_a_wilson_interval():
    chk = Registry().register("t", "m", "iia", (">=", 0.9), kind="finding", run=_noop)
    (row,) = rows_for(chk, Result.proportion(0.93, 2000, detail={"variable": "WX"}), 0.0)
    lo, hi = row["detail"]["ci95"]
    assert row["detail"]["n"] == 2000 and lo < 0.93 < hi and row["passed"] is True
    (small,) = rows_for(chk, Result.proportion(0.93, 20), 0.0)
    assert small["detail"]["ci95"][0] < 0.9 and small["passed"] is False  # too few examples to claim it


def test_an_interval_that_misses_its_value_or_a_bad_n_fails_the_row():
    chk = Registry().register("t", "m", "iia", (">=", 0.9), kind="finding", run=_noop)
    (row,) = rows_for(chk, Result(0.93, interval=(0.95, 0.99)), 0.0)
    assert row["passed"] is False and "does not contain" in row["error"]
    (row,) = rows_for(chk, Result(0.93, n=0), 0.0)
    assert "positive number of examples" in row["error"]


def test_tally_and_exit_status_separate_checks_from_findings():
    rows = [_row("check", True), _row("check", True), _row("finding", True), _row("finding", False),
            _row("info", None)]
    counts = tally(rows)
    assert (counts["checks_passed"], counts["checks_failed"], counts["findings_reproduced"],
            counts["findings_not_reproduced"], counts["info"], counts["errors"]) == (2, 0, 1, 1, 1, 0)
    assert tally_line(counts) == "checks 2/2 · findings 1/2 reproduced · 1 for information"
    assert exit_status(rows) == 0 and exit_status(rows, strict=True) == 1
    assert exit_status(rows + [_row("check", False)]) == 1
    assert exit_status(rows + [_row("finding", False, error="ValueError: boom")]) == 1  # a row that raised
    assert exit_status(rows + [_row("check", False)], fail=False) == 0


def test_schema_1_rows_are_read_as_checks_or_info():
    old = {k: v for k, v in _row("check", False).items() if k != "kind"}
    assert tally([old])["checks_failed"] == 1
    assert tally([{**old, "threshold": None, "passed": None}])["info"] == 1


def test_summary_line_opens_with_both_tallies(tmp_path):
    board = {"rows": [_row("check", True), _row("finding", False)], "seconds": 3.0}
    assert summary(board, tmp_path).startswith("checks 1/1 · findings 0/1 reproduced · 0 for information in ")


def test_the_progress_line_says_whether_a_finding_was_reproduced():
    from mechscope.bench.progress import outcome_text

    assert outcome_text([_row("finding", False), _row("finding", True), _row("check", False)]) == \
        "NOT reproduced x 1 >= 0.5; reproduced x 1 >= 0.5; FAIL x 1 >= 0.5"
