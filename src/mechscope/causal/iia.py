"""Interchange-intervention accuracy (IIA).

IIA is the fraction of (base, sources) examples on which the network, run on the base
with each aligned variable's features taken from its source, outputs the causal model's
counterfactual label. It is reported only on examples where the network is right on the
base and on every source without intervention, with the number kept::

    result = iia(model, data, alignment, readout=last_position)
    result.value, result.kept, result.n_pairs

Two alignments (or two hypotheses) scored on the *same* pairs differ by a paired
difference: :func:`hits` gives each kept pair's 1 or 0, and :func:`paired_contrast` the
mean difference with a percentile bootstrap interval over the pairs (the hypotheses spec:
"a paired bootstrap of the IIA difference gives a confidence interval").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, Mixer
from mechscope.causal.counterfactual import CounterfactualData, CounterfactualError, batch_len, take
from mechscope.causal.engine import Engine, Readout, identity_readout, make_engine
from mechscope.core.replay import reference_logits
from mechscope.core.stats import bootstrap_interval


@dataclass(frozen=True)
class IIAResult:
    """IIA on ``kept`` of ``n_pairs`` examples (those the model gets right unintervened)."""

    value: float
    kept: int
    n_pairs: int
    data: str = ""
    engine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"IIA {self.value:.3f} on {self.kept}/{self.n_pairs} pairs ({self.data})"


def _describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"a tensor {list(inputs.shape)} of {inputs.dtype}"
    if isinstance(inputs, dict):
        return "a dict {" + ", ".join(f"{k}: {_describe_inputs(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


def predict(model: nn.Module, inputs: Any, readout: Readout = identity_readout, batch_size: int = 4096,
            what: str = "inputs") -> Tensor:
    """The model's predicted class for every row of ``inputs`` ([n] long), in chunks."""
    n = batch_len(inputs)
    preds = []
    for start in range(0, n, batch_size):
        rows = take(inputs, torch.arange(start, min(start + batch_size, n)))
        try:
            logits = readout(reference_logits(model, rows))
        except Exception as e:  # noqa: BLE001 - report what the model was given, and how to fix it
            raise CounterfactualError(
                f"the model cannot take the counterfactual data's {what} ({_describe_inputs(rows)}): "
                f"{type(e).__name__}: {e}. The task's to_model_inputs must build what {type(model).__name__}.forward "
                "accepts, and the readout must map the model's logits to [batch, classes]") from None
        if logits.dim() != 2:
            raise CounterfactualError(f"the readout gave logits of shape {list(logits.shape)}; it must give "
                                      "[batch, classes] (for a language model, e.g. the last position's logits)")
        preds.append(logits.argmax(-1))
    return torch.cat(preds)


def correct_mask(model: nn.Module, data: CounterfactualData, readout: Readout = identity_readout,
                 batch_size: int = 4096) -> Tensor:
    """[n] bool: the model is right on the base and on every source, without intervention."""
    ok = predict(model, data.base, readout, batch_size, "base inputs") == data.base_labels
    for v in data.variables:
        ok &= predict(model, data.sources[v], readout, batch_size, f"source inputs of {v}") == data.source_labels[v]
    return ok


def keep_correct(model: nn.Module, data: CounterfactualData, readout: Readout = identity_readout,
                 batch_size: int = 4096) -> CounterfactualData:
    """The examples the model gets right unintervened; none left is an error."""
    ok = correct_mask(model, data, readout, batch_size)
    if not bool(ok.any()):
        base_acc = float((predict(model, data.base, readout, batch_size) == data.base_labels).float().mean())
        raise CounterfactualError(
            f"no examples of {data.name or 'the counterfactual data'} are left after keeping those where the model is "
            f"right on the base and every source (0 of {len(data)}; accuracy on the bases {base_acc:.2f}). IIA is "
            "undefined: check that the model is trained for this task, that the readout picks the right logits, "
            "and that the labels use the model's class indices")
    data = data.subset(torch.nonzero(ok).flatten())
    data.meta["n_pairs"] = int(ok.numel())
    return data


def engine_hits(engine: Engine, labels: Tensor, mixer: Mixer, batch_size: int = 4096) -> Tensor:
    """[n] bool: whether each of the engine's examples, intervened by ``mixer``, gets its label."""
    out = []
    with torch.no_grad():
        for start in range(0, engine.n, batch_size):
            idx = torch.arange(start, min(start + batch_size, engine.n))
            out.append(engine.logits(idx, mixer).argmax(-1) == labels.index_select(0, idx))
    return torch.cat(out)


def accuracy_of(engine: Engine, labels: Tensor, mixer: Mixer, batch_size: int = 4096) -> float:
    """Fraction of the engine's examples whose intervened prediction equals ``labels``."""
    return int(engine_hits(engine, labels, mixer, batch_size).sum()) / engine.n


def check_labels(engine: Engine, labels: Tensor) -> None:
    with torch.no_grad():
        classes = engine.logits(torch.arange(min(2, engine.n)), lambda v, b, s: b).shape[-1]
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        raise CounterfactualError(f"labels range over {int(labels.min())}..{int(labels.max())}, but the readout gives "
                                  f"{classes} classes; map the causal model's output to class indices 0..{classes - 1}")


def iia(model: nn.Module, data: CounterfactualData, alignment: Alignment, readout: Readout = identity_readout,
        *, batch_size: int = 4096, engine: str = "auto", filter_correct: bool = True) -> IIAResult:
    """IIA of ``alignment`` on ``data`` (see the module docstring).

    ``engine``: ``"auto"`` precomputes everything before the site when the model allows
    it, ``"full"`` runs whole forwards through hooks (same numbers).
    """
    missing = [v for v in data.variables if v not in alignment.places]
    if missing:
        raise CounterfactualError(f"the data intervenes on {missing}, which the alignment does not place; "
                                  f"it aligns {list(alignment.variables)}")
    n_pairs = len(data)
    was_training = model.training
    model.eval()
    try:
        kept = keep_correct(model, data, readout, batch_size) if filter_correct else data
        places = {v: alignment[v].site for v in kept.variables}
        eng = make_engine(model, kept, places, readout, engine)
        for site in set(places.values()):
            alignment.check_width(site, int(eng.base_views(site, torch.arange(1)).shape[-1]))
        check_labels(eng, kept.labels)
        value = accuracy_of(eng, kept.labels, alignment.mixer(), batch_size)
    finally:
        model.train(was_training)
    return IIAResult(value, len(kept), n_pairs, data.name, eng.kind)


def hits(model: nn.Module, data: CounterfactualData, alignment: Alignment, readout: Readout = identity_readout,
         batch_size: int = 4096) -> Tensor:
    """[kept] bool: for each pair the model gets right unintervened, whether the interchange
    under ``alignment`` gives the counterfactual label (their mean is the IIA)."""
    was = model.training
    model.eval()
    try:
        kept = keep_correct(model, data, readout, batch_size)
        mixer = alignment.restrict(kept.variables).mixer()
        eng = make_engine(model, kept, {v: alignment[v].site for v in kept.variables}, readout)
        return engine_hits(eng, kept.labels, mixer, batch_size)
    finally:
        model.train(was)


@dataclass(frozen=True)
class Contrast:
    """IIA(a) − IIA(b) on ``n`` shared pairs, with its paired-bootstrap 95 % interval."""

    value: float
    interval: tuple[float, float]
    n: int
    iia_a: float
    iia_b: float

    def to_dict(self) -> dict[str, Any]:
        return {"difference": self.value, "ci95": list(self.interval), "n": self.n, "iia_a": self.iia_a,
                "iia_b": self.iia_b}


def paired_contrast(hits_a: Tensor, hits_b: Tensor, seed: int = 0) -> Contrast:
    """The mean of ``hits_a − hits_b`` on the same pairs and its bootstrap interval.

    ``hits_a``, ``hits_b``: [n] bool, or [m, n] for m sites scored on the same n pairs
    (e.g. one per layer), whose difference is then averaged over the sites pair by pair
    (MIB's average over layers) before resampling the pairs.
    """
    if hits_a.shape != hits_b.shape or hits_a.ndim not in (1, 2):
        raise ValueError(f"paired hits must be two [n] (or [sites, n]) tensors on the same pairs, got "
                         f"{tuple(hits_a.shape)} and {tuple(hits_b.shape)}")
    a, b = hits_a.double().reshape(-1, hits_a.shape[-1]), hits_b.double().reshape(-1, hits_b.shape[-1])  # [m, n]
    diff = (a - b).mean(0)  # [n]: in {-1, 0, 1} for one site
    value = float(diff.mean())
    lo, hi = bootstrap_interval(diff, seed=seed)
    # the percentile interval of a constant (identical alignments) is that constant; keep the value inside
    lo, hi = min(lo, value), max(hi, value)
    return Contrast(value, (lo, hi), int(diff.numel()), float(a.mean()), float(b.mean()))
