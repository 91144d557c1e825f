"""Turn what a check returned (or raised) into scoreboard rows. Pure functions."""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any, Sequence

from mechscope.bench.context import Result
from mechscope.bench.registry import Check, Criterion


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
    if metric not in check.criteria:
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
    detail = dict(result.detail)
    problem = problem or _sample(result, value, detail)
    if problem:
        return error_row(check, problem, seconds, detail, metric=metric, baselines=baselines)
    crit = check.criteria[metric]
    return {
        "task": check.task, "method": check.method, "metric": metric, "kind": crit.kind, "value": value,
        "threshold": crit.threshold.to_dict() if crit.threshold else None,
        "passed": crit.verdict(value, result.interval),
        "baselines": baselines, "seconds": round(seconds, 3),
        "detail": jsonable({**detail, **registration(crit)}), **_source(crit),
    }


def _sample(result: Result, value: Any, detail: dict[str, Any]) -> str | None:
    """Put ``n`` and the interval into ``detail``; a problem with them fails the row."""
    if result.n is not None:
        if isinstance(result.n, bool) or not isinstance(result.n, int) or result.n < 1:
            return f"n is {result.n!r}; it must be the positive number of examples the value was computed on"
        detail["n"] = result.n
    if result.interval is not None:
        lo, hi = (as_number(v) for v in result.interval)
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            return f"interval {result.interval!r} is not two finite numbers"
        slack = 1e-9 * max(1.0, abs(value))
        if not lo - slack <= value <= hi + slack:
            return f"interval [{lo:.4g}, {hi:.4g}] does not contain the value {value:.4g}"
        detail["ci95"] = [lo, hi]
    return None


def registration(crit: Criterion) -> dict[str, Any]:
    """What a row's detail says about its criterion's history: the amendment, if any."""
    out: dict[str, Any] = {}
    if crit.amended_from is not None:
        out["amended_from"] = crit.amended_from.to_dict()
    if crit.after_observation:
        out["registered_after_observation"] = True
    return out


def _source(crit: Criterion) -> dict[str, Any]:
    return {k: v for k, v in (("source", crit.source), ("known_cause", crit.known_cause)) if v}


def _bad_number(what: str, raw: Any, number: int | float | None) -> str | None:
    if number is None:
        return f"{what} is {type(raw).__name__} {raw!r:.60}, not a number; report a float"
    if not math.isfinite(number):
        return f"{what} is {number} (not finite): the computation failed, so the row fails"
    return None


def error_row(check: Check, error: str, seconds: float, detail: Any = None, *,
              metric: str | None = None, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """A failed row: ``value`` null, ``passed`` false, ``error`` says why."""
    crit = check.criteria.get(metric or check.metric) or check.criteria[check.metric]
    return {
        "task": check.task, "method": check.method, "metric": metric or check.metric, "kind": crit.kind,
        "value": None, "threshold": crit.threshold.to_dict() if crit.threshold else None, "passed": False,
        "baselines": {k: v for k, v in (baselines or {}).items() if v is not None},
        "seconds": round(seconds, 3), "detail": jsonable({**(detail or {}), **registration(crit)}),
        "error": error, **_source(crit),
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
