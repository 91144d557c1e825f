"""Registry of bench checks: (task, method, metric) with a criterion written down in code.

A check is registered where it is defined, with its pre-registered threshold::

    from mechscope.bench import Result, check

    @check("hierarchical_equality", "das", "iia", threshold=(">=", 0.95),
           baselines={"random_subspace": "IIA of a random subspace of the same size"})
    def das_iia(ctx):
        ...
        return Result(iia, baselines={"random_subspace": rand}, detail={"layer": 1})

The function receives a :class:`~mechscope.bench.context.CheckContext` and returns a
:class:`~mechscope.bench.context.Result`, a list of them (several rows, e.g. one per
variable), or a bare number. A check that reports further metrics declares them, with their
own thresholds, in ``other_metrics``; a row may only carry a declared metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

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


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"{kind} name {name!r} must be lower_snake_case "
                            f"(letters, digits, single underscores; starting with a letter), "
                            f"e.g. 'hierarchical_equality'")
    return name


@dataclass(frozen=True)
class Check:
    """One registered check. ``thresholds`` maps every metric it may report to its criterion."""

    task: str
    method: str
    metric: str
    run: Callable[..., Any]
    thresholds: Mapping[str, Threshold | None]
    baselines: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    full_only: bool = False

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/{self.metric}"

    @property
    def threshold(self) -> Threshold | None:
        return self.thresholds[self.metric]


class Registry:
    """An ordered set of checks keyed by (task, method, metric)."""

    def __init__(self) -> None:
        self._checks: dict[tuple[str, str, str], Check] = {}

    def register(self, task: str, method: str, metric: str, threshold: ThresholdLike = None, *,
                 run: Callable[..., Any], baselines: Mapping[str, str] | Iterable[str] = (),
                 other_metrics: Mapping[str, ThresholdLike] | None = None,
                 description: str = "", full_only: bool = False) -> Check:
        """Register ``run`` as a check. ``full_only`` checks run only under ``--full``."""
        for kind, name in (("task", task), ("method", method), ("metric", metric)):
            check_name(kind, name)
        thresholds = {metric: as_threshold(threshold)}
        for extra, spec in (other_metrics or {}).items():
            thresholds[check_name("metric", extra)] = as_threshold(spec)
        if not callable(run):
            raise RegistryError(f"check {task}/{method}/{metric}: run must be callable, got {run!r}")
        docs = dict(baselines) if isinstance(baselines, Mapping) else {b: "" for b in baselines}
        new = Check(task, method, metric, run, thresholds, docs,
                    description or (run.__doc__ or "").strip().split("\n")[0], full_only)
        key = (task, method, metric)
        if key in self._checks and self._checks[key].run is not run:
            raise RegistryError(f"check {new.name} is registered twice (by "
                                f"{_where(self._checks[key].run)} and {_where(run)}); "
                                f"give one of them another metric name")
        self._checks[key] = new
        return new

    def check(self, task: str, method: str, metric: str, threshold: ThresholdLike = None,
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

    def tasks(self) -> list[str]:
        return sorted({c.task for c in self})

    def pairs(self) -> list[str]:
        return sorted({f"{c.task}/{c.method}" for c in self})

    def select(self, only: Sequence[str] = (), full: bool = False) -> list[Check]:
        """Checks named by ``only`` (task names or task/method pairs; empty = all).

        Full-only checks are dropped unless ``full``. Raises :class:`SelectionError` for a
        name that matches nothing, listing the valid ones.
        """
        wanted = [n.strip() for n in only if n.strip()]
        valid = set(self.tasks()) | set(self.pairs())
        unknown = [n for n in wanted if n not in valid]
        if unknown:
            raise SelectionError(selection_message(unknown, self.tasks(), self.pairs()))
        chosen = [c for c in self if not wanted or c.task in wanted or f"{c.task}/{c.method}" in wanted]
        return [c for c in chosen if full or not c.full_only]


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
