import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.bench.context import Result
from mechscope.bench.registry import Registry
from mechscope.bench.scoring import exception_row, jsonable, rows_for

ROW_KEYS = {"task", "method", "metric", "kind", "value", "threshold", "passed", "baselines", "seconds", "detail"}


def _check(threshold=(">=", 0.9), **kwargs):
    kwargs.setdefault("kind", "check" if threshold is not None else None)
    return Registry().register("toy_task", "das", "iia", threshold, run=lambda ctx: None, **kwargs)


def test_result_row_passes_against_threshold():
    (row,) = rows_for(_check(), Result(0.95, baselines={"random_subspace": 0.5}, detail={"layer": 1}), 1.23456)
    assert set(row) == ROW_KEYS
    assert row == {"task": "toy_task", "method": "das", "metric": "iia", "kind": "check", "value": 0.95,
                   "threshold": {"op": ">=", "value": 0.9}, "passed": True,
                   "baselines": {"random_subspace": 0.5}, "seconds": 1.235, "detail": {"layer": 1}}


def test_bare_number_and_failure():
    (row,) = rows_for(_check(), 0.5, 0.0)
    assert row["value"] == 0.5 and row["passed"] is False and "error" not in row


def test_no_threshold_means_information_row():
    (row,) = rows_for(_check(None), 3, 0.0)
    assert row["threshold"] is None and row["passed"] is None and row["value"] == 3


def test_several_rows_and_other_metrics():
    chk = _check(other_metrics={"kept": None})
    rows = rows_for(chk, [Result(0.99, detail={"variable": "wx"}), Result(0.5, detail={"variable": "yz"}),
                          Result(1987, metric="kept")], 2.0)
    assert [(r["metric"], r["passed"]) for r in rows] == [("iia", True), ("iia", False), ("kept", None)]
    assert [r["detail"] for r in rows[:2]] == [{"variable": "wx"}, {"variable": "yz"}]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), torch.tensor(math.nan)])
def test_non_finite_value_is_failed_row(value):
    (row,) = rows_for(_check(None), Result(value), 0.0)
    assert row["passed"] is False and row["value"] is None
    assert "not finite" in row["error"]


def test_non_finite_baseline_is_failed_row():
    (row,) = rows_for(_check(), Result(0.95, baselines={"shuffled": math.nan, "ok": 0.1}), 0.0)
    assert row["passed"] is False and "baseline 'shuffled'" in row["error"]
    assert row["baselines"] == {"ok": 0.1}


@pytest.mark.parametrize("outcome,message", [
    ("0.9", "expected a Result"), (None, "expected a Result"), ([], "empty"), ([0.9], "other than Result"),
    (Result("high"), "not a number"), (Result(True), "not a number"),
])
def test_bad_outcomes_are_failed_rows(outcome, message):
    (row,) = rows_for(_check(), outcome, 0.0)
    assert row["passed"] is False and message in row["error"]


def test_undeclared_metric_is_failed_row():
    (row,) = rows_for(_check(), Result(1.0, metric="surprise"), 0.0)
    assert row["passed"] is False and "other_metrics={'surprise'" in row["error"]


def test_numpy_and_torch_scalars_become_plain_numbers():
    rows = rows_for(_check(), [Result(np.float64(0.93), baselines={"b": torch.tensor(0.25)}),
                               Result(torch.tensor(0.5))], 0.0)
    assert type(rows[0]["value"]) is float and rows[0]["passed"] is True
    assert rows[0]["baselines"] == {"b": 0.25}
    assert rows[1]["value"] == 0.5


def test_exception_row_names_exception_and_place():
    def explode():
        raise KeyError("layer 7")

    try:
        explode()
    except KeyError as e:
        row = exception_row(_check(), e, 0.5)
    assert row["passed"] is False and row["value"] is None
    assert row["error"].startswith("KeyError: 'layer 7' (at test_scoring.py:")
    assert "in explode" in row["error"]
    assert "Traceback" in row["detail"]["traceback"]


def test_jsonable():
    out = jsonable({"a": (1, 2), "b": np.arange(3), "c": Path("x"), "d": math.nan, 3: torch.tensor([1.5]),
                    "e": object})
    assert out == {"a": [1, 2], "b": [0, 1, 2], "c": "x", "d": None, "3": [1.5], "e": str(object)}
