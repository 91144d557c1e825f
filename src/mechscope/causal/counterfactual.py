"""Counterfactual data: (base, one source per intervened variable, counterfactual label).

:func:`make_counterfactuals` samples high-level inputs, solves the causal model on the
base and on every source, computes the counterfactual label
``H_{V1 <- V1(s1), V2 <- V2(s2), ...}(b)``, balances the examples over (counterfactual
class, whether the intervention changes the output) and turns the high-level inputs into
model inputs with the task's ``to_model_inputs``. The same seed gives the same data.

Model inputs are a tensor, or a dict of tensors, whose first dimension is the example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from mechscope.causal.model import CausalModel

Sampler = Callable[[int, torch.Generator], Mapping[str, Tensor]]  # (n, generator) -> {input var: [n, ...]}
ToModelInputs = Callable[[Mapping[str, Tensor]], Any]  # high-level inputs -> model inputs (batch first)


class CounterfactualError(ValueError):
    """Counterfactual data that cannot be made, combined or used as asked."""


@dataclass
class CounterfactualData:
    """``n`` interchange examples.

    ``variables``: the variables this data can intervene on, each with its own source
    inputs in ``sources``; ``active[v]`` says for which examples ``v`` is really
    intervened (where it is not, its source is the base itself, so the interchange is the
    identity: this lets data intervening on WX, on YZ and on both share one batch).
    ``labels``: counterfactual class of each example; ``base_labels`` and
    ``source_labels[v]``: the class the causal model gives the base and each source
    without intervention (what the network must get right for the pair to be kept).
    """

    variables: tuple[str, ...]
    base: Any
    sources: dict[str, Any]
    labels: Tensor  # [n] long
    base_labels: Tensor  # [n] long
    source_labels: dict[str, Tensor]  # var -> [n] long
    active: dict[str, Tensor]  # var -> [n] bool
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.labels.shape[0])
        if n == 0:
            raise CounterfactualError(f"counterfactual data {self.name!r} is empty; make at least one example")
        for v in self.variables:
            for what, table in (("sources", self.sources), ("source_labels", self.source_labels), ("active", self.active)):
                if v not in table:
                    raise CounterfactualError(f"counterfactual data {self.name!r}: variable {v!r} has no {what} entry")
        for what, x in [("base", self.base), *((f"source of {v}", self.sources[v]) for v in self.variables)]:
            if batch_len(x) != n:
                raise CounterfactualError(f"counterfactual data {self.name!r}: {what} holds {batch_len(x)} examples, "
                                          f"the labels {n}; every part must have one row per example")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def changed(self) -> Tensor:  # [n] bool
        """Whether the intervention changes the causal model's output."""
        return self.labels != self.base_labels

    def subset(self, idx: Tensor | Sequence[int]) -> "CounterfactualData":
        """Examples ``idx``, in that order; the high-level inputs in ``meta["high_level"]`` (one
        row per example) follow them, so a hypothesis still labels every pair it keeps."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        meta = dict(self.meta)
        if "high_level" in meta:
            meta["high_level"] = _rows_of(meta["high_level"], idx, len(self))
        return CounterfactualData(
            self.variables, take(self.base, idx), {v: take(s, idx) for v, s in self.sources.items()},
            self.labels[idx], self.base_labels[idx], {v: t[idx] for v, t in self.source_labels.items()},
            {v: t[idx] for v, t in self.active.items()}, self.name, meta)

    def describe(self) -> str:
        counts = {f"class {c}": int((self.labels == c).sum()) for c in self.labels.unique().tolist()}
        return (f"{self.name or 'counterfactual data'}: {len(self)} examples intervening on {list(self.variables)}, "
                f"{int(self.changed.sum())} change the output; {counts}")


def _rows_of(value: Any, idx: Tensor, n: int) -> Any:
    """Rows ``idx`` of every tensor or list with ``n`` rows inside ``value`` (nested mappings)."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
        return value.index_select(0, idx.to(value.device))
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in idx.tolist()]
    if isinstance(value, Mapping):
        return {k: _rows_of(v, idx, n) for k, v in value.items()}
    return value


# -- model-input helpers ----------------------------------------------------------------
def batch_len(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        return batch_len(next(iter(inputs.values())))
    if isinstance(inputs, tuple):
        return batch_len(inputs[0])
    raise CounterfactualError(f"model inputs must be a tensor, a tuple or a dict of tensors with the example "
                              f"first, got {type(inputs).__name__}")


def take(inputs: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of model inputs (a tensor, tuple or dict of tensors)."""
    if isinstance(inputs, Tensor):
        return inputs.index_select(0, idx.to(inputs.device))  # ~4x faster than inputs[idx] on CPU
    if isinstance(inputs, Mapping):
        return {k: take(v, idx) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(take(v, idx) for v in inputs)
    return inputs


def cat_inputs(parts: Sequence[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise CounterfactualError(f"cannot combine model inputs of row shapes {sorted(shapes)}; pad them to one length "
                                      "first (mechscope.core.batch.collate with max_len=)")
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        keys = set(first)
        if any(set(p) != keys for p in parts):
            raise CounterfactualError("cannot combine model inputs with different keys")
        return {k: cat_inputs([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(cat_inputs([p[i] for p in parts]) for i in range(len(first)))
    raise CounterfactualError(f"cannot combine model inputs of type {type(first).__name__}")


# -- making data ----------------------------------------------------------------------
def default_label(value: Tensor) -> Tensor:
    """Output values (bools or class ints) as class indices."""
    value = torch.as_tensor(value)
    if value.is_floating_point():
        raise CounterfactualError("the causal model's output is a float; pass label_of= to map it to class indices")
    return value.long()


def make_counterfactuals(
    causal_model: CausalModel,
    variables: str | Sequence[str],
    sampler: Sampler,
    n: int,
    to_model_inputs: ToModelInputs,
    *,
    label_of: Callable[[Tensor], Tensor] = default_label,
    seed: int = 0,
    balance: bool = True,
    max_rounds: int = 50,
    name: str = "",
) -> CounterfactualData:
    """``n`` interchange examples intervening on ``variables`` (each from its own source).

    ``sampler(k, generator)`` draws ``k`` high-level inputs as ``{input variable: [k, ...]}``.
    With ``balance`` the examples are spread evenly over the buckets (counterfactual
    class, output changed or not) that occur; a bucket that never occurs in
    ``max_rounds`` draws is an error naming it (pass ``balance=False`` to accept the
    natural distribution).
    """
    variables = (variables,) if isinstance(variables, str) else tuple(variables)
    if not variables:
        raise CounterfactualError("name at least one variable to intervene on")
    causal_model.check_names(variables, "the counterfactual data")
    if n < 1:
        raise CounterfactualError(f"n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    chunks: list[dict[str, Any]] = []
    need = _quotas(n, causal_model, label_of) if balance else None
    have: dict[tuple[int, bool], int] = {}
    for _ in range(max_rounds):
        draw = _draw(causal_model, variables, sampler, max(2 * n, 64), gen, label_of)
        if balance and need is None:  # an output without a value set: balance over the classes seen
            need = _split(n, [(c, ch) for c in sorted(set(draw["labels"].tolist())) for ch in (False, True)])
        keep = _select(draw, need, have, n - sum(len(c["labels"]) for c in chunks))
        chunks.append({k: _index(v, keep) for k, v in draw.items()})
        if sum(len(c["labels"]) for c in chunks) >= n:
            break
    else:
        raise CounterfactualError(_shortfall(need, have, variables, max_rounds))
    data = {k: _concat([c[k] for c in chunks]) for k in chunks[0]}
    order = torch.randperm(n, generator=gen)  # interleave the buckets
    data = {k: _index(v, order) for k, v in data.items()}
    return CounterfactualData(
        variables=variables,
        base=to_model_inputs(data["base"]),
        sources={v: to_model_inputs(data["src:" + v]) for v in variables},
        labels=data["labels"], base_labels=data["base_labels"],
        source_labels={v: data["srclab:" + v] for v in variables},
        active={v: torch.ones(n, dtype=torch.bool) for v in variables},
        name=name or "+".join(variables),
        meta={"seed": seed, "balanced": balance, "high_level": {"base": data["base"], **{v: data["src:" + v] for v in variables}}},
    )


def _draw(model: CausalModel, variables: tuple[str, ...], sampler: Sampler, k: int, gen: torch.Generator,
          label_of: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    base = dict(sampler(k, gen))
    sources = {v: dict(sampler(k, gen)) for v in variables}
    labels = label_of(model.interchange(base, sources)[model.output])
    out: dict[str, Any] = {"base": base, "labels": labels, "base_labels": label_of(model.run(base))}
    for v in variables:
        out["src:" + v] = sources[v]
        out["srclab:" + v] = label_of(model.run(sources[v]))
    return out


def _quotas(n: int, model: CausalModel, label_of: Callable[[Tensor], Tensor]) -> dict[tuple[int, bool], int] | None:
    """Equal shares of ``n`` for every (class, changed) bucket, when the classes are known."""
    values = model.variables[model.output].values
    if values is None:
        return None
    classes = sorted(set(label_of(torch.as_tensor(values)).tolist()))
    return _split(n, [(c, ch) for c in classes for ch in (False, True)])


def _split(n: int, buckets: list[tuple[int, bool]]) -> dict[tuple[int, bool], int]:
    q, r = divmod(n, len(buckets))
    return {b: q + (i < r) for i, b in enumerate(buckets)}


def _select(draw: dict[str, Any], need: dict | None, have: dict, room: int) -> Tensor:
    """Indices of the drawn examples to keep, filling each bucket up to its quota."""
    labels, changed = draw["labels"], draw["labels"] != draw["base_labels"]
    if need is None:  # natural distribution, or classes unknown: keep in order
        return torch.arange(min(room, len(labels)))
    keep = []
    for (c, ch), quota in need.items():
        idx = torch.nonzero((labels == c) & (changed == ch)).flatten()
        take_n = max(0, min(quota - have.get((c, ch), 0), len(idx)))
        have[(c, ch)] = have.get((c, ch), 0) + take_n
        keep.append(idx[:take_n])
    return torch.cat(keep).sort().values


def _shortfall(need: dict | None, have: dict, variables: tuple[str, ...], rounds: int) -> str:
    missing = {f"class {c}, {'changed' if ch else 'unchanged'}": f"{have.get((c, ch), 0)}/{q}"
               for (c, ch), q in (need or {}).items() if have.get((c, ch), 0) < q}
    return (f"could not fill every bucket of balanced counterfactual data intervening on {list(variables)} in "
            f"{rounds} rounds of sampling; short: {missing}. Some (class, changed) combination may be impossible "
            "for this intervention or very rare under the sampler: fix the sampler, or pass balance=False")


def _index(value: Any, idx: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value[idx]
    if isinstance(value, dict):
        return {k: _index(v, idx) for k, v in value.items()}
    raise TypeError(type(value))


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}


# -- combining data -------------------------------------------------------------------
def combine(datasets: Iterable[CounterfactualData], name: str = "") -> CounterfactualData:
    """One dataset from several intervening on different variables (e.g. WX, YZ, both).

    Variables a part does not intervene on get the base as their source (an identity
    interchange) and ``active`` False there.
    """
    parts = list(datasets)
    if not parts:
        raise CounterfactualError("combine() needs at least one dataset")
    variables = tuple(dict.fromkeys(v for d in parts for v in d.variables))
    src = {v: cat_inputs([d.sources.get(v, d.base) for d in parts]) for v in variables}
    src_lab = {v: torch.cat([d.source_labels.get(v, d.base_labels) for d in parts]) for v in variables}
    active = {v: torch.cat([d.active.get(v, torch.zeros(len(d), dtype=torch.bool)) for d in parts]) for v in variables}
    return CounterfactualData(variables, cat_inputs([d.base for d in parts]), src,
                              torch.cat([d.labels for d in parts]), torch.cat([d.base_labels for d in parts]),
                              src_lab, active, name or "+".join(d.name for d in parts))
