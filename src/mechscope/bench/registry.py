"""Registry of bench rows: (task, method, metric) with a criterion written down in code.

Every metric a check reports is of one of three kinds:

- a **check** says the program is right (a patched run equals the hand computation, a
  weight edit equals its hook): only a bug, not training, can make it fail;
- a **finding** is a claim about a network that the literature makes and the bench tests
  (DAS beats neurons, a 1-layer model cannot do induction); it is reproduced or not, and
  either is a result;
- **info** is a figure shown with no criterion (timings, sizes, quantities bounded by
  construction).

A check is registered where it is defined, with its pre-registered threshold, its kind
and where the threshold comes from::

    from mechscope.bench import Criterion, Result, amended, check

    @check("hierarchical_equality", "das", "iia", threshold=(">=", 0.95), kind="finding",
           source="Geiger et al. 2024 (DAS), Table 1",
           other_metrics={"gap": Criterion.check(">", 0.0)},
           baselines={"random_subspace": "IIA of a random subspace of the same size"})
    def das_iia(ctx):
        ...
        return Result(iia, n=2000, interval=wilson_interval(iia, 2000), detail={"layer": 1})

A criterion changed after the row first ran is an *amendment*: it keeps the original, the
reason and the date (``amended_from=amended((">", 3.0), "why", "2026-12-06")``) and says
whether the value was known when the new criterion was written (``after_observation``).
The function receives a :class:`~mechscope.bench.context.CheckContext` and returns a
:class:`~mechscope.bench.context.Result`, a list of them (several rows, e.g. one per
variable), or a bare number. A row may only carry a declared metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

KINDS = ("check", "finding", "info")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


class RegistryError(ValueError):
    """A check was registered with a bad name, threshold or a duplicate key."""


class SelectionError(ValueError):
    """``--only`` named something that is not a registered task or task/method pair."""


@dataclass(frozen=True)
class Threshold:
    """A pre-registered criterion: ``value_found <op> value``."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise RegistryError(f"threshold op {self.op!r} is not one of {', '.join(OPS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) \
                or not math.isfinite(self.value):
            raise RegistryError(f"threshold value must be a finite number, got {self.value!r}")

    def passes(self, value: float) -> bool:
        return bool(OPS[self.op](value, self.value))

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "value": self.value}

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


ThresholdLike = Union[Threshold, Sequence[Any], None]


def as_threshold(spec: ThresholdLike) -> Threshold | None:
    """``None``, a ``Threshold`` or an ``(op, value)`` pair -> ``Threshold | None``."""
    if spec is None or isinstance(spec, Threshold):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return Threshold(str(spec[0]), spec[1])
    raise RegistryError(f"threshold must be (op, value) such as ('>=', 0.95), or None; got {spec!r}")


@dataclass(frozen=True)
class Amendment:
    """A criterion that replaced ``original`` (None: the row had none) on ``date``, for ``reason``."""

    original: Threshold | None
    reason: str
    date: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise RegistryError("an amendment must say why the criterion changed (reason='...')")
        if not isinstance(self.date, str) or not DATE_RE.match(self.date):
            raise RegistryError(f"an amendment's date must be YYYY-MM-DD, got {self.date!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.original.to_dict() if self.original else None,
                "reason": self.reason, "date": self.date}


def amended(original: ThresholdLike, reason: str, date: str) -> Amendment:
    """The record of an amendment: the criterion it replaced (``(op, value)`` or None), why, when."""
    return Amendment(as_threshold(original), reason, date)


@dataclass(frozen=True)
class Criterion:
    """A metric's kind and pre-registered threshold (None for info), with where it comes from.

    ``known_cause`` says, for a finding, what is known about why it may not reproduce here
    (shown beside a finding that did not); ``after_observation`` marks a criterion written
    when the value it judges was already known.
    """

    threshold: Threshold | None
    kind: str
    source: str = ""
    known_cause: str = ""
    amended_from: Amendment | None = None
    after_observation: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RegistryError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.threshold is None) != (self.kind == "info"):
            raise RegistryError(f"a {self.kind} needs " + ("no threshold" if self.kind == "info" else
                                "a threshold (op, value); a figure with none is kind='info'"))

    @classmethod
    def check(cls, op: str, value: float, **kwargs: Any) -> "Criterion":
        """The program is right: only a bug can make this fail."""
        return cls(Threshold(op, value), "check", **kwargs)

    @classmethod
    def finding(cls, op: str, value: float, **kwargs: Any) -> "Criterion":
        """A claim about a network, reproduced or not."""
        return cls(Threshold(op, value), "finding", **kwargs)

    @classmethod
    def info(cls, **kwargs: Any) -> "Criterion":
        """A figure shown without a criterion."""
        return cls(None, "info", **kwargs)

    def verdict(self, value: float, interval: Sequence[float] | None = None) -> bool | None:
        """Passed (check) or reproduced (finding); None for info. A finding with a confidence
        interval is reproduced only when the whole interval clears the threshold."""
        if self.threshold is None:
            return None
        if self.kind != "finding" or interval is None:
            return self.threshold.passes(value)
        lo, hi = interval
        ends = {">=": (lo,), ">": (lo,), "<=": (hi,), "<": (hi,), "==": (lo, hi)}[self.threshold.op]
        return all(self.threshold.passes(v) for v in ends)


CriterionLike = Union[Criterion, ThresholdLike]


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"{kind} name {name!r} must be lower_snake_case "
                            f"(letters, digits, single underscores; starting with a letter), "
                            f"e.g. 'hierarchical_equality'")
    return name


@dataclass(frozen=True)
class Check:
    """One registered check. ``criteria`` maps every metric it may report to its criterion."""

    task: str
    method: str
    metric: str
    run: Callable[..., Any]
    criteria: Mapping[str, Criterion]
    baselines: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    full_only: bool = False
    suite: str = "default"

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/{self.metric}"

    @property
    def thresholds(self) -> dict[str, Threshold | None]:
        return {m: c.threshold for m, c in self.criteria.items()}

    @property
    def threshold(self) -> Threshold | None:
        return self.criteria[self.metric].threshold

    @property
    def kind(self) -> str:
        return self.criteria[self.metric].kind


class Registry:
    """An ordered set of checks keyed by (task, method, metric)."""

    def __init__(self) -> None:
        self._checks: dict[tuple[str, str, str], Check] = {}

    def register(self, task: str, method: str, metric: str, threshold: CriterionLike = None, *,
                 run: Callable[..., Any], kind: str | None = None, source: str = "",
                 known_cause: str = "", amended_from: Amendment | None = None,
                 after_observation: bool = False,
                 baselines: Mapping[str, str] | Iterable[str] = (),
                 other_metrics: Mapping[str, CriterionLike] | None = None,
                 description: str = "", full_only: bool = False, suite: str = "default") -> Check:
        """Register ``run`` as a check. ``full_only`` checks run only under ``--full``; a check
        of another ``suite`` than ``default`` (``real``: the reference real model) runs only
        under ``--suite`` of that name.

        ``threshold`` with ``kind`` (and ``source``, ``known_cause``, ``amended_from``,
        ``after_observation``) is the main metric's criterion; an ``(op, value)`` in
        ``other_metrics`` is of the same kind and source, None there is info, and a
        :class:`Criterion` says its own.
        """
        for what, name in (("task", task), ("method", method), ("metric", metric)):
            check_name(what, name)
        where = f"{task}/{method}/{metric}"
        main = _criterion(where, threshold, kind, dict(source=source, known_cause=known_cause,
                          amended_from=amended_from, after_observation=after_observation))
        criteria = {metric: main}
        for extra, spec in (other_metrics or {}).items():
            inherit = kind if main.kind != "info" and spec is not None else None
            criteria[check_name("metric", extra)] = _criterion(f"{task}/{method}/{extra}", spec, inherit,
                                                               dict(source=source) if spec is not None else {})
        if not callable(run):
            raise RegistryError(f"check {task}/{method}/{metric}: run must be callable, got {run!r}")
        docs = dict(baselines) if isinstance(baselines, Mapping) else {b: "" for b in baselines}
        new = Check(task, method, metric, run, criteria, docs,
                    description or (run.__doc__ or "").strip().split("\n")[0], full_only, check_name("suite", suite))
        key = (task, method, metric)
        if key in self._checks and self._checks[key].run is not run:
            raise RegistryError(f"check {new.name} is registered twice (by "
                                f"{_where(self._checks[key].run)} and {_where(run)}); "
                                f"give one of them another metric name")
        self._checks[key] = new
        return new

    def check(self, task: str, method: str, metric: str, threshold: CriterionLike = None,
              **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`register`; returns the function unchanged."""
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(task, method, metric, threshold, run=fn, **kwargs)
            return fn
        return decorate

    def __iter__(self) -> Iterator[Check]:
        return iter(self._checks.values())

    def __len__(self) -> int:
        return len(self._checks)

    def tasks(self, suite: str = "default") -> list[str]:
        return sorted({c.task for c in self if c.suite == suite})

    def pairs(self, suite: str = "default") -> list[str]:
        return sorted({f"{c.task}/{c.method}" for c in self if c.suite == suite})

    def select(self, only: Sequence[str] = (), full: bool = False, suite: str = "default") -> list[Check]:
        """Checks of ``suite`` named by ``only`` (task names or task/method pairs; empty = all).

        Full-only checks are dropped unless ``full``. Raises :class:`SelectionError` for a
        name that matches nothing, listing the valid ones.
        """
        wanted = [n.strip() for n in only if n.strip()]
        tasks, pairs = self.tasks(suite), self.pairs(suite)
        unknown = [n for n in wanted if n not in set(tasks) | set(pairs)]
        if unknown:
            raise SelectionError(selection_message(unknown, tasks, pairs))
        chosen = [c for c in self if c.suite == suite and (not wanted or c.task in wanted
                                                            or f"{c.task}/{c.method}" in wanted)]
        return [c for c in chosen if full or not c.full_only]


def _criterion(where: str, spec: CriterionLike, kind: str | None, extra: dict[str, Any]) -> Criterion:
    """A metric's Criterion from what was registered; a threshold without a kind is refused."""
    if isinstance(spec, Criterion):
        return spec
    threshold = as_threshold(spec)
    if threshold is None:
        if kind not in (None, "info"):
            raise RegistryError(f"{where}: kind={kind!r} needs a threshold; a figure with none is kind='info'")
        return Criterion(None, "info", **{k: v for k, v in extra.items() if k in ("source", "amended_from")})
    if kind is None:
        raise RegistryError(f"{where} has a threshold but no kind: say kind='check' (only a bug can make it "
                            f"fail) or kind='finding' (a claim about a network)")
    return Criterion(threshold, kind, **extra)


def selection_message(unknown: list[str], tasks: list[str], pairs: list[str]) -> str:
    import difflib
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, tasks + pairs, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not tasks:
        return f"unknown check name {', '.join(hints)}: no checks are registered"
    return (f"unknown check name {', '.join(hints)}; --only takes task names or task/method pairs, "
            f"comma-separated.\n  tasks: {', '.join(tasks)}\n  task/method: {', '.join(pairs)}")


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


REGISTRY = Registry()
"""The global registry that the modules listed in :mod:`mechscope.bench.catalog` fill."""

check = REGISTRY.check
register_check = REGISTRY.register
