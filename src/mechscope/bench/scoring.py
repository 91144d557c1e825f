"""Turn what a check returned (or raised) into scoreboard rows. Pure functions."""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any, Sequence

from mechscope.bench.context import Result
from mechscope.bench.registry import Check


def rows_for(check: Check, outcome: Any, seconds: float) -> list[dict[str, Any]]:
    """Rows for a check's return value: a Result, a list of Results, or a bare number."""
    results = _as_results(outcome)
    if isinstance(results, str):
        return [error_row(check, results, seconds)]
    return [make_row(check, r, seconds) for r in results]


def _as_results(outcome: Any) -> list[Result] | str:
    if isinstance(outcome, Result):
        return [outcome]
    if isinstance(outcome, Sequence) and not isinstance(outcome, (str, bytes)):
        if outcome and all(isinstance(r, Result) for r in outcome):
            return list(outcome)
        return (f"check returned a {type(outcome).__name__} that is empty or holds something other "
                f"than Result objects; return a Result, a non-empty list of Results, or a number")
    if as_number(outcome) is not None:
        return [Result(outcome)]
    return (f"check returned {type(outcome).__name__}; expected a Result, a list of Results, or a "
            f"number")


def as_number(x: Any) -> int | float | None:
    """A plain Python int/float for ints, floats and 0-d numpy/torch values; None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    item = getattr(x, "item", None)
    if callable(item) and getattr(x, "ndim", 0) == 0:
        try:
            return as_number(item())
        except (ValueError, RuntimeError, TypeError):
            return None
    return None


def make_row(check: Check, result: Result, seconds: float) -> dict[str, Any]:
    """Score one Result against its pre-registered criterion."""
    metric = result.metric or check.metric
    if metric not in check.thresholds:
        return error_row(check, f"metric {metric!r} is not registered for check {check.name}; "
                         f"declare it with other_metrics={{{metric!r}: (op, value) or None}}",
                         seconds, result.detail)
    value = as_number(result.value)
    problem = _bad_number("value", result.value, value)
    baselines: dict[str, float] = {}
    for name, raw in dict(result.baselines).items():
        number = as_number(raw)
        problem = problem or _bad_number(f"baseline {name!r}", raw, number)
        baselines[str(name)] = number if number is not None and math.isfinite(number) else None
    if problem:
        return error_row(check, problem, seconds, result.detail, metric=metric, baselines=baselines)
    threshold = check.thresholds[metric]
    return {
        "task": check.task, "method": check.method, "metric": metric, "value": value,
        "threshold": threshold.to_dict() if threshold else None,
        "passed": threshold.passes(value) if threshold else None,
        "baselines": baselines, "seconds": round(seconds, 3), "detail": jsonable(result.detail),
    }


def _bad_number(what: str, raw: Any, number: int | float | None) -> str | None:
    if number is None:
        return f"{what} is {type(raw).__name__} {raw!r:.60}, not a number; report a float"
    if not math.isfinite(number):
        return f"{what} is {number} (not finite): the computation failed, so the row fails"
    return None


def error_row(check: Check, error: str, seconds: float, detail: Any = None, *,
              metric: str | None = None, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """A failed row: ``value`` null, ``passed`` false, ``error`` says why."""
    threshold = check.thresholds.get(metric or check.metric)
    return {
        "task": check.task, "method": check.method, "metric": metric or check.metric, "value": None,
        "threshold": threshold.to_dict() if threshold else None, "passed": False,
        "baselines": {k: v for k, v in (baselines or {}).items() if v is not None},
        "seconds": round(seconds, 3), "detail": jsonable(detail or {}), "error": error,
    }


def exception_row(check: Check, exc: BaseException, seconds: float) -> dict[str, Any]:
    """A failed row for a check that raised: the error names the exception and where."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" \
        if frames else ""
    message = f"{type(exc).__name__}: {exc}{where}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))
    return error_row(check, message, seconds, {"traceback": tb})


def jsonable(x: Any) -> Any:
    """A JSON-safe copy: numbers from numpy/torch scalars, lists for tuples and arrays,
    strings for paths and anything else, None for non-finite floats."""
    if x is None or isinstance(x, (bool, str)):
        return x
    number = as_number(x)
    if number is not None:
        return number if math.isfinite(number) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    tolist = getattr(x, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    return str(x)
