"""High-level causal models: the algorithm a network is hypothesised to implement.

A :class:`CausalModel` is a set of :class:`Variable`\\ s, each with a value set, parents
and a mechanism computing its value from its parents' values; input variables have no
parents; one variable is the output. It is acyclic (checked when it is built)::

    model = CausalModel([
        Variable("W"), Variable("X"), Variable("Y"), Variable("Z"),
        Variable("WX", (False, True), ("W", "X"), lambda w, x: (w == x).all(-1)),
        Variable("YZ", (False, True), ("Y", "Z"), lambda y, z: (y == z).all(-1)),
        Variable("O", (False, True), ("WX", "YZ"), lambda a, b: a == b),
    ], output="O")
    model.solve({"W": w, "X": x, "Y": y, "Z": z})             # every variable's value
    model.interchange(base, {"WX": source})                    # H_{WX <- WX(source)}(base)

Values may be Python scalars (one example) or tensors whose first dimension is the batch
(mechanisms written with torch operations then solve a whole batch at once, which is what
makes counterfactual data cheap to generate). A model whose mechanisms only take single
examples sets ``vectorized=False``: :meth:`solve` then loops over the batch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor


class CausalModelError(ValueError):
    """A causal model that cannot be built or solved as written."""


@dataclass(frozen=True)
class Variable:
    """One variable: its name, allowed values (``None``: any), parents and mechanism.

    ``mechanism(*parent_values)`` computes the value from the parents' values, in the
    order of ``parents``. Input variables have no parents and no mechanism.
    """

    name: str
    values: tuple | None = None
    parents: tuple[str, ...] = ()
    mechanism: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CausalModelError(f"a variable needs a non-empty string name, got {self.name!r}")
        if self.values is not None:
            object.__setattr__(self, "values", tuple(self.values))
            if not self.values:
                raise CausalModelError(f"variable {self.name!r} has an empty value set; give at least one value or None for any")
        object.__setattr__(self, "parents", tuple(self.parents))
        if self.parents and self.mechanism is None:
            raise CausalModelError(f"variable {self.name!r} has parents {list(self.parents)} but no mechanism; "
                                   "pass mechanism=lambda *parent_values: ...")
        if not self.parents and self.mechanism is not None:
            raise CausalModelError(f"variable {self.name!r} has a mechanism but no parents; an input variable takes "
                                   "its value from the input, so drop the mechanism or name its parents")

    @property
    def is_input(self) -> bool:
        return not self.parents


def _near(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CausalModel:
    """An acyclic causal model with one output variable (see the module docstring)."""

    def __init__(self, variables: Sequence[Variable], output: str, vectorized: bool = True) -> None:
        names = [v.name for v in variables]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CausalModelError(f"variable names must be unique; repeated: {dupes}")
        self.variables: dict[str, Variable] = {v.name: v for v in variables}
        for v in variables:
            for p in v.parents:
                if p not in self.variables:
                    raise CausalModelError(f"variable {v.name!r} has unknown parent {p!r}{_near(p, names)}; "
                                           f"variables: {names}")
        if output not in self.variables:
            raise CausalModelError(f"output {output!r} is not a variable{_near(output, names)}; variables: {names}")
        self.output = output
        self.vectorized = vectorized
        self.order: tuple[str, ...] = _topological_order(self.variables)
        self.inputs: tuple[str, ...] = tuple(n for n in self.order if self.variables[n].is_input)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}<-{list(self.variables[n].parents)}" if self.variables[n].parents else n for n in self.order)
        return f"CausalModel({inner}; output={self.output})"

    def check_names(self, names: Iterable[str], what: str) -> None:
        for n in names:
            if n not in self.variables:
                raise CausalModelError(f"{what} names unknown variable {n!r}{_near(n, self.variables)}; "
                                       f"variables: {list(self.order)}")

    # -- solving ----------------------------------------------------------------------
    def solve(self, inputs: Mapping[str, Any], interventions: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every variable's value for ``inputs``, with ``interventions`` held fixed.

        An intervened variable keeps its given value whatever its parents are; inputs
        that are intervened on need not be given.
        """
        interventions = dict(interventions or {})
        self.check_names(interventions, "an intervention")
        self.check_names(inputs, "the inputs")
        missing = [n for n in self.inputs if n not in inputs and n not in interventions]
        if missing:
            raise CausalModelError(f"inputs {missing} are missing; the model's input variables are {list(self.inputs)}")
        n = _batch_size(inputs) if not self.vectorized else None
        if n is None:
            return self._solve_one(inputs, interventions)
        # mechanisms that take one example: solve row by row and stack the results
        rows = [self._solve_one(_row(inputs, i), _row(interventions, i)) for i in range(n)]
        return {k: _stack([r[k] for r in rows]) for k in self.order}

    def _solve_one(self, inputs: Mapping[str, Any], interventions: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.order:
            var = self.variables[name]
            if name in interventions:
                value = interventions[name]
            elif var.is_input:
                value = inputs[name]
            else:
                value = var.mechanism(*(values[p] for p in var.parents))
            _check_value(var, value, "set by an intervention" if name in interventions else
                         "given as input" if var.is_input else "returned by its mechanism")
            values[name] = value
        return values

    def run(self, inputs: Mapping[str, Any], interventions: Mapping[str, Any] | None = None) -> Any:
        """The output variable's value."""
        return self.solve(inputs, interventions)[self.output]

    def interchange(self, base: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Solve ``base`` with each variable in ``sources`` set to its value on its own source.

        ``sources`` maps a variable to the inputs of the source it takes its value from
        (one source per intervened variable). Returns every variable's value; the output's
        is the counterfactual label.
        """
        self.check_names(sources, "an interchange")
        fixed = {var: self.solve(src)[var] for var, src in sources.items()}
        return self.solve(base, fixed)


def _topological_order(variables: Mapping[str, Variable]) -> tuple[str, ...]:
    """Kahn's algorithm; a cycle is an error naming the variables on it."""
    children: dict[str, list[str]] = {n: [] for n in variables}
    indegree = {n: len(v.parents) for n, v in variables.items()}
    for n, v in variables.items():
        for p in v.parents:
            children[p].append(n)
    ready = [n for n in variables if indegree[n] == 0]
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for c in children[n]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) < len(variables):
        stuck = [n for n in variables if n not in order]
        raise CausalModelError(f"the causal model has a cycle through {stuck}; a causal model must be acyclic "
                               "(no variable may depend, directly or not, on itself)")
    return tuple(order)


def _batch_size(values: Mapping[str, Any]) -> int | None:
    for v in values.values():
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


def _row(values: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: (v[i] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in values.items()}


def _stack(items: list[Any]) -> Any:
    if all(isinstance(x, Tensor) for x in items):
        return torch.stack(items)
    return torch.as_tensor(items)


def _check_value(var: Variable, value: Any, how: str) -> None:
    """A value outside the variable's value set is an error naming both."""
    if var.values is None:
        return
    if isinstance(value, Tensor):
        allowed = _allowed_tensor(var.values)
        if allowed is not None:
            ok = torch.isin(value.double(), allowed)  # bools and ints compare exactly as float64
            if bool(ok.all()):
                return
            bad = value[~ok].flatten()[:5].tolist()
            raise CausalModelError(f"variable {var.name!r}: value(s) {bad} {how} are outside its value set "
                                   f"{list(var.values)[:12]}")
        if value.dim() == 0 and value.item() in var.values:
            return
    elif any(_same(value, v) for v in var.values):
        return
    raise CausalModelError(f"variable {var.name!r}: value {value!r} {how} is outside its value set {list(var.values)[:12]}")


def _allowed_tensor(values: tuple) -> Tensor | None:
    if all(isinstance(v, (bool, int, float)) for v in values):
        return torch.tensor(values, dtype=torch.float64)
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot compare are different
        return False
