"""Hypotheses as values: a causal model plus where each of its variables lives, tested.

A :class:`Hypothesis` names a high-level causal model and an alignment: for each variable
it claims, the place (site, featurizer, features) that realises it in the network. It is
tested by interchange interventions on counterfactual pairs (Geiger et al.)::

    h = Hypothesis("rotated", causal_model, {"P": Place(site, basis, (0,)), "Q": Place(site, basis, (1,))})
    data = h.counterfactuals(sample, 400, to_inputs, seed=0)   # every variable from its own source
    result = test(h, model, data)      # IIA of P alone, Q alone, both together; pairs kept; 95 % CIs
    print(result.table())
    c = compare(h, rival, model, data)  # the same pairs; paired bootstrap of the IIA difference
    c.winner                            # "rotated", the rival's name, or None (the interval holds 0)

Every number is measured on the same pairs: those the network gets right, without
intervention, on the base and on every source (for :func:`compare`: under both hypotheses'
causal models). The labels of each interchange (one variable alone, all together) are
recomputed from the data's high-level inputs by the hypothesis's own causal model, so two
rival hypotheses with different causal models (an intermediate ``S = X + Y`` against
``T = Y + Z``) are scored on the same (base, source) inputs; :func:`compare` pairs their
variables by name, or else by position (the first rival variable takes the first source).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, AlignmentError, Mixer, Place
from mechscope.causal.counterfactual import (
    CounterfactualData,
    Sampler,
    ToModelInputs,
    batch_len,
    default_label,
    make_counterfactuals,
)
from mechscope.causal.engine import Readout, identity_readout, make_engine
from mechscope.causal.iia import Contrast, check_labels, correct_mask, engine_hits, paired_contrast
from mechscope.causal.model import CausalModel, CausalModelError
from mechscope.core.run import find_module
from mechscope.core.site import SiteError
from mechscope.core.stats import wilson_interval

LabelOf = Callable[[Tensor], Tensor]


class HypothesisError(ValueError):
    """A hypothesis, or data to test it on, that does not fit its causal model or network."""


@dataclass(frozen=True, eq=False)
class Hypothesis:
    """A causal model and, for each variable it claims, its place in the network.

    ``alignment``: an :class:`Alignment` or a ``{variable: Place}`` mapping (checked for
    overlapping features at one site). Variables must be the causal model's.
    """

    name: str
    causal_model: CausalModel
    alignment: Alignment | Mapping[str, Place]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise HypothesisError(f"a hypothesis needs a non-empty name, got {self.name!r}")
        if not isinstance(self.causal_model, CausalModel):
            raise HypothesisError(f"hypothesis {self.name!r}: causal_model must be a CausalModel, "
                                  f"got {type(self.causal_model).__name__}")
        if not isinstance(self.alignment, Alignment):
            try:
                object.__setattr__(self, "alignment", Alignment(dict(self.alignment)))
            except AlignmentError as e:
                raise HypothesisError(f"hypothesis {self.name!r}: {e}") from None
        known = list(self.causal_model.order)
        for v in self.alignment.variables:
            if v not in self.causal_model.variables:
                close = difflib.get_close_matches(v, known, n=1, cutoff=0.5)
                near = f" (did you mean {close[0]!r}?)" if close else ""
                raise HypothesisError(f"hypothesis {self.name!r} aligns variable {v!r}, which its causal model does "
                                      f"not have{near}; its variables are {known}: rename the alignment's variable "
                                      "or add it to the causal model")

    @property
    def variables(self) -> tuple[str, ...]:
        return self.alignment.variables

    def describe(self) -> str:
        return f"{self.name}: {self.alignment.describe()}"

    def counterfactuals(self, sampler: Sampler, n: int, to_model_inputs: ToModelInputs, *, seed: int = 0,
                        label_of: LabelOf = default_label, balance: bool = True) -> CounterfactualData:
        """``n`` pairs intervening on all of the hypothesis's variables, each from its own source."""
        return make_counterfactuals(self.causal_model, self.variables, sampler, n, to_model_inputs,
                                    label_of=label_of, seed=seed, balance=balance, name=f"{self.name} pairs")

    def check_sites(self, model: nn.Module) -> None:
        """Every variable's site must be a module of ``model``."""
        for v in self.variables:
            site = self.alignment[v].site
            try:
                find_module(model, site.path)
            except SiteError as e:
                raise HypothesisError(f"hypothesis {self.name!r} places {v!r} at {site}, a site "
                                      f"{type(model).__name__} does not have: {e}") from None


@dataclass(frozen=True, eq=False)
class Score:
    """IIA of one interchange (one variable alone, or all together) on the kept pairs."""

    variables: tuple[str, ...]
    iia: float
    interval: tuple[float, float]  # Wilson 95 %
    hits: Tensor  # [kept] bool, pair by pair

    @property
    def label(self) -> str:
        return self.variables[0] if len(self.variables) == 1 else "+".join(self.variables) + " together"

    def to_dict(self) -> dict[str, Any]:
        return {"variables": list(self.variables), "iia": self.iia, "ci95": list(self.interval)}


@dataclass(frozen=True, eq=False)
class HypothesisResult:
    """A hypothesis's IIA for each variable alone and for all together, on ``kept`` of ``n_pairs``."""

    hypothesis: str
    variables: dict[str, Score]
    joint: Score
    kept: int
    n_pairs: int
    data: str = ""
    engine: str = ""

    def scores(self) -> list[Score]:
        return list(self.variables.values()) + ([self.joint] if len(self.variables) > 1 else [])

    def to_dict(self) -> dict[str, Any]:
        return {"hypothesis": self.hypothesis, "variables": {v: s.to_dict() for v, s in self.variables.items()},
                "joint": self.joint.to_dict(), "kept": self.kept, "n_pairs": self.n_pairs, "data": self.data,
                "engine": self.engine}

    def summary(self) -> str:
        return (f"hypothesis {self.hypothesis!r}: IIA {self.joint.iia:.3f} {_ci(self.joint.interval)} with "
                f"{'+'.join(self.joint.variables)} interchanged, on {self.kept}/{self.n_pairs} pairs kept")

    def table(self) -> str:
        width = max(12, *(len(s.label) for s in self.scores()))
        head = (f"hypothesis {self.hypothesis!r} on {self.data or 'the data'}: {self.kept} of {self.n_pairs} pairs "
                "kept (the model right on the base and every source)")
        rows = [head, f"{'interchange':<{width}}  {'IIA':>5}  95 % CI (Wilson)"]
        rows += [f"{s.label:<{width}}  {s.iia:5.3f}  {_ci(s.interval)}" for s in self.scores()]
        return "\n".join(rows)


def _ci(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


# -- the data, seen by one hypothesis -----------------------------------------------------
@dataclass(frozen=True, eq=False)
class _View:
    """The data with a hypothesis's variables, sources and its causal model's labels."""

    data: CounterfactualData  # variables = the hypothesis's; labels: all interchanged together
    single: dict[str, Tensor]  # variable -> [n] label with only that variable interchanged


def _pairing(h: Hypothesis, data: CounterfactualData, by_position: bool) -> dict[str, str]:
    """Hypothesis variable -> the data variable whose source it takes."""
    if set(h.variables) == set(data.variables):
        return {v: v for v in h.variables}
    if by_position and len(h.variables) == len(data.variables):
        return dict(zip(h.variables, data.variables))
    raise HypothesisError(
        f"hypothesis {h.name!r} places {list(h.variables)} but the data intervenes on {list(data.variables)}; "
        "a test interchanges each variable alone and all together, so make the data over exactly the "
        "hypothesis's variables (hypothesis.counterfactuals(sampler, n, to_model_inputs))")


def _high_level(data: CounterfactualData) -> dict[str, Any]:
    inactive = [v for v in data.variables if not bool(data.active[v].all())]
    if inactive:
        raise HypothesisError(f"counterfactual data {data.name!r} leaves {inactive} unintervened on some pairs "
                              "(combine()d data); a hypothesis needs every pair to intervene on every variable: "
                              "make it with hypothesis.counterfactuals")
    high = data.meta.get("high_level")
    n = len(data)
    if not isinstance(high, Mapping) or any(k not in high for k in ("base", *data.variables)) or \
            any(_rows(high[k]) != n for k in ("base", *data.variables)):
        raise HypothesisError(
            f"counterfactual data {data.name!r} carries no high-level inputs for its {n} pairs (meta['high_level']), "
            "which a hypothesis needs to label each interchange; make it with make_counterfactuals or "
            "hypothesis.counterfactuals (subset() keeps them; data built by hand or concatenated may not)")
    return dict(high)


def _rows(values: Any) -> int:
    return batch_len(dict(values)) if isinstance(values, Mapping) and values else -1


def _view(h: Hypothesis, data: CounterfactualData, pairing: Mapping[str, str], label_of: LabelOf) -> _View:
    high, cm = _high_level(data), h.causal_model
    src = {hv: high[dv] for hv, dv in pairing.items()}
    try:
        base_labels = label_of(cm.run(high["base"]))
        source_labels = {v: label_of(cm.run(s)) for v, s in src.items()}
        joint = label_of(cm.interchange(high["base"], src)[cm.output])
        single = {v: label_of(cm.interchange(high["base"], {v: s})[cm.output]) for v, s in src.items()}
    except CausalModelError as e:
        raise HypothesisError(f"hypothesis {h.name!r}: its causal model cannot solve the high-level inputs of "
                              f"{data.name!r}: {e}") from None
    n = len(data)
    view = CounterfactualData(h.variables, data.base, {v: data.sources[pairing[v]] for v in h.variables}, joint,
                              base_labels, source_labels, {v: torch.ones(n, dtype=torch.bool) for v in h.variables},
                              data.name, {"n_pairs": n})
    return _View(view, single)


def _matches_labels(view: _View, data: CounterfactualData) -> bool:
    return bool(torch.equal(view.data.labels, data.labels.to(view.data.labels.dtype)))


def _label_mismatch(names: list[str], data: CounterfactualData) -> HypothesisError:
    who = " or of ".join(repr(n) for n in names)
    return HypothesisError(
        f"the labels of {data.name!r} are not those the causal model of {who} gives its pairs; make the data from "
        "the hypothesis (hypothesis.counterfactuals(...)), or pass the label_of it was made with")


def _kept(model: nn.Module, views: Mapping[str, _View], readout: Readout, batch_size: int) -> Tensor:
    """[kept] long: the pairs the model gets right on the base and every source, under every view."""
    masks = {name: correct_mask(model, v.data, readout, batch_size) for name, v in views.items()}
    ok = torch.stack(list(masks.values())).all(0)  # [n]
    if not bool(ok.any()):
        first = next(iter(views.values())).data
        each = ", ".join(f"{int(m.sum())} under {name!r}" for name, m in masks.items())
        raise HypothesisError(
            f"no pair of {first.name!r} is left after keeping those the model gets right on the base and every source "
            f"(0 of {len(first)}; {each}); IIA is undefined: check that the model is trained for this task, that "
            "the readout picks the right logits, and that the labels use the model's class indices")
    return torch.nonzero(ok).flatten()


def _only(mixer: Mixer, variables: set[str]) -> Mixer:
    """``mixer`` for ``variables``; every other variable keeps the base's view."""
    return lambda v, base, source: mixer(v, base, source) if v in variables else base


def _score(h: Hypothesis, model: nn.Module, view: _View, idx: Tensor, readout: Readout, engine: str,
           batch_size: int) -> HypothesisResult:
    """IIA of each variable alone and of all together on the pairs ``idx`` of ``view``."""
    kept = view.data.subset(idx)
    places = {v: h.alignment[v].site for v in h.variables}
    eng = make_engine(model, kept, places, readout, engine)
    for site in set(places.values()):
        h.alignment.check_width(site, int(eng.base_views(site, torch.arange(1)).shape[-1]))
    check_labels(eng, kept.labels)
    mixer, n = h.alignment.mixer(), len(kept)

    def score(variables: tuple[str, ...], labels: Tensor) -> Score:
        hit = engine_hits(eng, labels, _only(mixer, set(variables)), batch_size)  # [kept] bool
        value = float(hit.double().mean())
        return Score(variables, value, wilson_interval(value, n), hit)

    alone = {v: score((v,), view.single[v].index_select(0, idx)) for v in h.variables}
    joint = alone[h.variables[0]] if len(h.variables) == 1 else score(h.variables, kept.labels)
    return HypothesisResult(h.name, alone, joint, n, len(view.data), view.data.name, eng.kind)


def _evaluated(model: nn.Module, run: Callable[[], Any]) -> Any:
    was = model.training
    model.eval()
    try:
        return run()
    finally:
        model.train(was)


def test(hypothesis: Hypothesis, model: nn.Module, data: CounterfactualData, readout: Readout = identity_readout,
         *, label_of: LabelOf = default_label, engine: str = "auto", batch_size: int = 4096) -> HypothesisResult:
    """IIA of each of the hypothesis's variables alone and of all of them together (each from its
    own source), on the pairs of ``data`` the model gets right unintervened, with Wilson 95 % intervals.

    ``data`` intervenes on exactly the hypothesis's variables (``hypothesis.counterfactuals``);
    ``label_of`` is the one it was made with.
    """
    hypothesis.check_sites(model)
    view = _view(hypothesis, data, _pairing(hypothesis, data, by_position=False), label_of)
    if not _matches_labels(view, data):
        raise _label_mismatch([hypothesis.name], data)

    def run() -> HypothesisResult:
        idx = _kept(model, {hypothesis.name: view}, readout, batch_size)
        return _score(hypothesis, model, view, idx, readout, engine, batch_size)
    return _evaluated(model, run)


# -- rival hypotheses -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Comparison:
    """Two hypotheses on the same pairs: IIA(a) − IIA(b) all interchanged together (``joint``) and
    per data source (``per_variable``, "a's variable vs b's"), each with a paired-bootstrap 95 % interval."""

    a: HypothesisResult
    b: HypothesisResult
    joint: Contrast
    per_variable: dict[str, Contrast]
    seed: int = 0

    @property
    def winner(self) -> str | None:
        """The hypothesis whose IIA is higher with an interval excluding 0; None if it holds 0."""
        lo, hi = self.joint.interval
        return self.a.hypothesis if lo > 0 else self.b.hypothesis if hi < 0 else None

    def summary(self) -> str:
        a, b, c = self.a.hypothesis, self.b.hypothesis, self.joint
        head = (f"{a!r} beats {b!r}" if self.winner == a else f"{b!r} beats {a!r}" if self.winner == b else
                f"neither {a!r} nor {b!r} wins (the interval holds 0)")
        return (f"{head} on the same {c.n} pairs: IIA {c.iia_a:.3f} vs {c.iia_b:.3f}, difference {c.value:+.3f} "
                f"{_ci(c.interval)} (paired bootstrap, 95 %, seed {self.seed})")

    def table(self) -> str:
        rows = [self.a.table(), self.b.table(), "IIA difference (a - b), paired bootstrap 95 % CI:"]
        rows += [f"  {k}: {c.value:+.3f} {_ci(c.interval)}" for k, c in self.per_variable.items()]
        rows += [f"  all together: {self.joint.value:+.3f} {_ci(self.joint.interval)}", self.summary()]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "joint": self.joint.to_dict(),
                "per_variable": {k: c.to_dict() for k, c in self.per_variable.items()}, "winner": self.winner,
                "seed": self.seed}


def compare(a: Hypothesis, b: Hypothesis, model: nn.Module, data: CounterfactualData,
            readout: Readout = identity_readout, *, seed: int = 0, label_of: LabelOf = default_label,
            engine: str = "auto", batch_size: int = 4096) -> Comparison:
    """Score two rival hypotheses on the same pairs of ``data`` and bootstrap their IIA difference.

    Each hypothesis takes its variables' sources from ``data`` by name, or else by position
    (rivals with different intermediate variables); each labels the pairs with its own causal
    model. Pairs are kept where the model is right unintervened under both; ``seed`` seeds the
    bootstrap.
    """
    if a.name == b.name:
        raise HypothesisError(f"both hypotheses are named {a.name!r}; give rivals different names so that the "
                              "winner can be told apart")
    pair_a, pair_b = _pairing(a, data, by_position=True), _pairing(b, data, by_position=True)
    for h in (a, b):
        h.check_sites(model)
    views = {a.name: _view(a, data, pair_a, label_of), b.name: _view(b, data, pair_b, label_of)}
    if not any(_matches_labels(v, data) for v in views.values()):
        raise _label_mismatch([a.name, b.name], data)

    def run() -> tuple[HypothesisResult, HypothesisResult]:
        idx = _kept(model, views, readout, batch_size)
        if idx.numel() < 2:
            raise HypothesisError(f"only {idx.numel()} pair of {data.name!r} is kept under both hypotheses; a paired "
                                  "bootstrap needs at least 2: give more pairs")
        return (_score(a, model, views[a.name], idx, readout, engine, batch_size),
                _score(b, model, views[b.name], idx, readout, engine, batch_size))
    ra, rb = _evaluated(model, run)
    by_source = {dv: vb for vb, dv in pair_b.items()}
    per_variable = {}
    if len(a.variables) > 1:
        per_variable = {f"{va} vs {by_source[dv]}": paired_contrast(ra.variables[va].hits,
                                                                   rb.variables[by_source[dv]].hits, seed)
                        for va, dv in pair_a.items()}
    return Comparison(ra, rb, paired_contrast(ra.joint.hits, rb.joint.hits, seed), per_variable, seed)
