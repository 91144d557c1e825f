"""Saving and loading alignments: safetensors weights plus a JSON config.

``save_alignment(directory, alignment, model)`` writes ``alignment.safetensors`` (every
featurizer's state, checksummed, via :mod:`mechscope.core.checkpoint`) and
``alignment.json``: for each variable its site, featurizer and features, the featurizers'
types and sizes, and a fingerprint of the model (its parameters' names, shapes and
dtypes). ``load_alignment(directory, model)`` rebuilds the alignment and refuses a model
of another shape, naming what differs. Featurizers shared by several variables (one
rotation, disjoint features) stay shared.

Built-in featurizers: Identity, Subspace, Rotation, PCA and StiefelSubspace. Another
featurizer (an SAE) is made loadable with :func:`register_featurizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mechscope.causal.alignment import Alignment, AlignmentError, Place
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.checkpoint import load_json, load_tensors, module_fingerprint, save_json_atomic, save_tensors
from mechscope.core.featurize import PCA, Featurizer, Identity, Rotation, Subspace
from mechscope.core.site import Site

FORMAT, VERSION = "mechscope.alignment", 1
WEIGHTS, CONFIG = "alignment.safetensors", "alignment.json"

# type name -> (class, spec of an instance, empty instance from a spec)
_TYPES: dict[str, tuple[type, Callable[[Any], dict], Callable[[dict], Featurizer]]] = {
    "identity": (Identity, lambda f: {"d": f.d}, lambda s: Identity(s["d"])),
    "stiefel_subspace": (StiefelSubspace, lambda f: {"d": f.d, "k": f.n_features},
                         lambda s: StiefelSubspace(s["d"], s["k"])),
    "rotation": (Rotation, lambda f: {"d": f.d}, lambda s: Rotation(s["d"])),
    "subspace": (Subspace, lambda f: {"d": f.d, "k": f.n_features}, lambda s: Subspace(s["d"], s["k"])),
    "pca": (PCA, lambda f: {"d": f.d, "k": f.n_features},
            lambda s: PCA(torch.zeros(s["d"]), torch.zeros(s["d"], s["k"]), torch.ones(s["k"]))),
}


def register_featurizer(name: str, cls: type, spec: Callable[[Any], dict], build: Callable[[dict], Featurizer]) -> None:
    """Make ``cls`` savable: ``spec(f)`` gives the JSON sizes, ``build(spec)`` an instance to load weights into."""
    _TYPES[name] = (cls, spec, build)


def _type_name(f: Featurizer) -> str:
    for name, (cls, _, _) in _TYPES.items():  # exact class first: Rotation is a Subspace
        if type(f) is cls:
            return name
    raise AlignmentError(f"cannot save a {type(f).__name__} featurizer: register it with "
                         "mechscope.causal.persist.register_featurizer(name, cls, spec, build)")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "fingerprint": module_fingerprint(model.state_dict())}


def save_alignment(directory: str | Path, alignment: Alignment, model: nn.Module, meta: Any = None) -> Path:
    """Write ``alignment`` (learnt for ``model``) to ``directory``; returns the directory."""
    directory = Path(directory)
    featurizers = list(dict.fromkeys(p.featurizer for p in alignment.places.values()))
    tensors = {f"f{i}.{k}": v.detach() for i, f in enumerate(featurizers) for k, v in f.state_dict().items()}
    config = {
        "format": FORMAT, "version": VERSION, "model": model_fingerprint(model),
        "featurizers": [{"type": _type_name(f), **_TYPES[_type_name(f)][1](f)} for f in featurizers],
        "variables": {v: {"site": p.site.to_dict(), "featurizer": featurizers.index(p.featurizer),
                          "features": None if p.features is None else list(p.features)}
                      for v, p in alignment.places.items()},
        "meta": meta,
    }
    save_tensors(directory / WEIGHTS, tensors, {"format": FORMAT})
    save_json_atomic(directory / CONFIG, config)
    return directory


def load_alignment(directory: str | Path, model: nn.Module) -> Alignment:
    """Rebuild an alignment saved by :func:`save_alignment` for ``model``'s architecture."""
    directory = Path(directory)
    config = load_json(directory / CONFIG, "alignment config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AlignmentError(f"{directory / CONFIG} is not a mechscope alignment (format {config.get('format')!r})")
    saved, here = config["model"], model_fingerprint(model)
    if saved["fingerprint"] != here["fingerprint"]:
        raise AlignmentError(
            f"{directory}: the alignment was learnt on a {saved['class']} whose parameters have other names or shapes "
            f"than this {here['class']} (architecture fingerprint {saved['fingerprint'][:12]} vs {here['fingerprint'][:12]}); "
            "its sites and widths would not fit. Load it onto the model it was learnt on")
    tensors, _ = load_tensors(directory / WEIGHTS)
    featurizers = []
    for i, spec in enumerate(config["featurizers"]):
        if spec["type"] not in _TYPES:
            raise AlignmentError(f"{directory}: featurizer type {spec['type']!r} is not registered here; known: {sorted(_TYPES)}")
        f = _TYPES[spec["type"]][2](spec)
        state = {k[len(f"f{i}."):]: v for k, v in tensors.items() if k.startswith(f"f{i}.")}
        f.load_state_dict(state, strict=True)
        featurizers.append(f)
    return Alignment({v: Place(Site.from_dict(e["site"]), featurizers[e["featurizer"]],
                               None if e["features"] is None else tuple(e["features"]))
                      for v, e in config["variables"].items()})
