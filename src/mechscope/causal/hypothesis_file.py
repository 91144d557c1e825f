"""Hypotheses written as JSON: variables, sites and featurizers by name (``mechscope hypothesis``).

A hypothesis to ``test`` or ``compare``::

    {"name": "S at hidden.1",
     "causal_model": "S",
     "variables": {"S": {"site": "acts.1", "featurizer": "identity", "features": [0, 1, 2, 3]}}}

- ``causal_model``: the name of one of the world's causal models (may be left out where
  the world has one);
- ``site``: a module path (its output), or a site object as ``Site.to_dict`` writes it
  (``{"path": "acts.1", "io": "input", ...}``);
- ``featurizer``: ``"identity"`` (neurons) or ``"pca"`` (principal components of the
  site's activations on the world's inputs, standardised); variables at one site with one
  featurizer share it, so overlapping features are refused;
- ``features``: indices in the featurizer's feature space (left out: all).

A causal-scrubbing hypothesis over a world's graph::

    {"name": "k_composition",
     "output": ["L1H0"],
     "claims": {"L1H0": {"parents": ["L1H0.q", "L1H0.k", "L1H0.v"]},
                "L1H0.k": {"parents": ["L0H0"], "key": null}, ...}}

``key``: what the node carries, by the name of one of the world's keys (``null`` or left
out: the input itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

from mechscope.causal.alignment import AlignmentError, Place
from mechscope.causal.hypothesis import Hypothesis, HypothesisError
from mechscope.causal.model import CausalModel
from mechscope.causal.scrub import Claim, ScrubError, ScrubHypothesis
from mechscope.core.featurize import PCA, Featurizer, FeaturizerError, Identity
from mechscope.core.site import Site, SiteError

FEATURIZERS = ("identity", "pca")
Activations = Callable[[Site], Tensor]  # site -> [n, d] activation rows on the world's inputs


def read_json(path: Path | str, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file or bad JSON is a clear error."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HypothesisError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a {what} is a JSON object") from None
    if not isinstance(spec, dict):
        raise HypothesisError(f"{path}: a {what} is a JSON object, got {type(spec).__name__}")
    return spec


def _fields(spec: Mapping[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    unknown, missing = sorted(set(spec) - allowed), sorted(required - set(spec))
    if unknown:
        raise HypothesisError(f"{where}: unknown field(s) {unknown}; valid: {sorted(allowed)}")
    if missing:
        raise HypothesisError(f"{where}: missing field(s) {missing}")


def _site(value: Any, where: str) -> Site:
    try:
        return Site(value) if isinstance(value, str) else Site.from_dict(value)
    except SiteError as e:
        raise HypothesisError(f"{where}: {e}") from None


def hypothesis_from_dict(spec: Mapping[str, Any], causal_models: Mapping[str, CausalModel],
                         activations: Activations) -> Hypothesis:
    """The :class:`Hypothesis` a JSON object describes (format: the module's docstring)."""
    _fields(spec, {"name", "causal_model", "variables"}, {"name", "variables"}, "hypothesis")
    name = spec["name"]
    cm_name = spec.get("causal_model")
    if cm_name is None and len(causal_models) == 1:
        cm_name = next(iter(causal_models))
    if cm_name not in causal_models:
        raise HypothesisError(f"hypothesis {name!r}: causal_model {cm_name!r} is not one of this world's: "
                              f"{sorted(causal_models)}")
    variables = spec["variables"]
    if not isinstance(variables, dict) or not variables:
        raise HypothesisError(f"hypothesis {name!r}: 'variables' must map each variable to its place, got {variables!r}")
    shared: dict[tuple[Site, str], Featurizer] = {}
    places = {}
    for var, place in variables.items():
        where = f"hypothesis {name!r}, variable {var!r}"
        if not isinstance(place, dict):
            raise HypothesisError(f"{where}: a place is an object with 'site' (and 'featurizer', 'features')")
        _fields(place, {"site", "featurizer", "features"}, {"site"}, where)
        site, kind = _site(place["site"], where), place.get("featurizer", "identity")
        if kind not in FEATURIZERS:
            raise HypothesisError(f"{where}: featurizer {kind!r} is not one of {list(FEATURIZERS)}")
        if (site, kind) not in shared:
            try:
                acts = activations(site)  # [n, d]
                shared[site, kind] = Identity(acts.shape[-1]) if kind == "identity" else PCA.fit(acts)
            except (SiteError, FeaturizerError) as e:
                raise HypothesisError(f"{where}: {e}") from None
        try:
            places[var] = Place(site, shared[site, kind], place.get("features"))
        except (AlignmentError, TypeError, ValueError) as e:
            raise HypothesisError(f"{where}: {e}") from None
    return Hypothesis(name, causal_models[cm_name], places)


def scrub_hypothesis_from_dict(spec: Mapping[str, Any], keys: Mapping[str, Tensor]) -> ScrubHypothesis:
    """The :class:`ScrubHypothesis` a JSON object describes; keys named from the world's ``keys``."""
    _fields(spec, {"name", "output", "claims"}, {"name", "output"}, "scrubbing hypothesis")
    name, claims = spec["name"], {}
    if not isinstance(spec["output"], list):
        raise HypothesisError(f"scrubbing hypothesis {name!r}: 'output' is a list of node names")
    for node, claim in (spec.get("claims") or {}).items():
        where = f"scrubbing hypothesis {name!r}, claim {node!r}"
        if not isinstance(claim, dict):
            raise HypothesisError(f"{where}: a claim is an object with 'parents' and 'key'")
        _fields(claim, {"parents", "key"}, set(), where)
        key = claim.get("key")
        if key is not None and key not in keys:
            raise HypothesisError(f"{where}: key {key!r} is not one of this world's: {sorted(keys) or 'none'} "
                                  "(null: the input itself)")
        claims[node] = Claim(tuple(claim.get("parents", ())), None if key is None else keys[key])
    try:
        return ScrubHypothesis(name, tuple(spec["output"]), claims)
    except ScrubError as e:
        raise HypothesisError(str(e)) from None
