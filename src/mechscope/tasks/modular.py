"""The Fourier algorithm of a modular-addition model, and its progress measures.

Reads a :class:`~mechscope.tasks.grokking.ModularAdditionTransformer` through its weights
and through activations cached at its sites on the full ``p × p`` input grid:

- key frequencies in four views: the embedding W_E, the neuron-to-logit map
  W_L = W_U W_out, the MLP neurons (each neuron's best frequency, weighted by the
  variance it explains) and the logits (their share along cos/sin(w_k (a + b − c)));
- restricted loss and accuracy (logits kept to the key-frequency components of
  cos/sin(w_k(a + b)), on all pairs) and excluded loss (those components removed, on the
  training pairs);
- Gini coefficients of the Fourier norms of W_E and W_L, and the total squared weights;
- the same measures over training, from the snapshots a training run keeps, with the
  phases of :mod:`mechscope.tasks.grokking_phases` found in them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechscope.circuits import fourier
from mechscope.core.checkpoint import save_json_atomic
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.tasks import grokking, grokking_phases

NEURONS = Site("blocks.0.mlp.act", name="neurons")
VIEWS = ("embed", "neuron_to_logit", "neurons", "logits")


def _grid(model: nn.Module) -> tuple[Tensor, Tensor]:
    return grokking.all_pairs(model.cfg.p)


def grid_logits(model: nn.Module) -> Tensor:  # [p*p, p] in (a, b) row-major order
    tokens, _ = _grid(model)
    with torch.no_grad():
        return model(tokens)


def neuron_grid(model: nn.Module) -> Tensor:  # [p, p, d_mlp]
    p = model.cfg.p
    tokens, _ = _grid(model)
    with torch.no_grad():
        acts = cache(model, tokens, [NEURONS])[NEURONS]  # [p*p, d_mlp]
    return acts.view(p, p, -1)


def neuron_to_logit(model: nn.Module) -> Tensor:  # [p, d_mlp]: W_L = W_U W_out
    return (model.unembed.weight @ model.blocks[0].mlp.fc_out.weight).detach()


def view_energies(model: nn.Module) -> dict[str, Tensor]:
    """Energy per frequency (k = 1..(p-1)/2) in each view."""
    p = model.cfg.p
    acts = neuron_grid(model)
    best, frac = fourier.neuron_frequencies(acts, p)
    variance = acts.double().reshape(p * p, -1).var(0)  # [d_mlp]
    neurons = torch.zeros(fourier.n_frequencies(p), dtype=torch.float64)
    neurons.index_add_(0, best - 1, variance * frac)  # variance each neuron's best frequency explains
    return {
        "embed": fourier.frequency_energy(model.embed.weight[:p], p),
        "neuron_to_logit": fourier.frequency_energy(neuron_to_logit(model), p),
        "neurons": neurons,
        "logits": fourier.logit_frequency_energy(grid_logits(model).view(p, p, p), p),
    }


def key_frequencies(model: nn.Module) -> dict[str, Any]:
    """Key frequencies per view, those all views agree on, and their union."""
    per_view = {name: fourier.key_frequencies(e) for name, e in view_energies(model).items()}
    sets = [set(v) for v in per_view.values()]
    return {"per_view": per_view, "agreed": sorted(set.intersection(*sets)), "union": sorted(set.union(*sets))}


def neuron_clusters(model: nn.Module) -> dict[str, Any]:
    """Each neuron's best frequency and the share of its variance that frequency explains."""
    best, frac = fourier.neuron_frequencies(neuron_grid(model), model.cfg.p)
    return {"frequency": best.tolist(), "explained": frac.tolist()}


def _loss(logits: Tensor, labels: Tensor) -> float:
    return float(F.cross_entropy(logits.double(), labels))


def progress_measures(model: nn.Module, keys: list[int]) -> dict[str, float]:
    """The paper's progress measures of one model, against the key frequencies ``keys``."""
    p = model.cfg.p
    tokens, labels = _grid(model)
    tr, te = grokking.split(model.cfg)
    logits = grid_logits(model)  # [p*p, p]
    out = {"train_loss": _loss(logits[tr], labels[tr]), "test_loss": _loss(logits[te], labels[te]),
           "test_acc": float((logits[te].argmax(-1) == labels[te]).double().mean())}
    if keys:
        restricted = fourier.restricted_logits(logits, p, keys)  # [p*p, p]
        out["restricted_loss"] = _loss(restricted, labels)
        out["restricted_acc"] = float((restricted.argmax(-1) == labels).double().mean())
        out["excluded_loss"] = _loss(fourier.excluded_logits(logits, p, keys)[tr], labels[tr])
    out["gini_embed"] = fourier.gini(fourier.fourier_norms(model.embed.weight[:p], p))
    out["gini_neuron_to_logit"] = fourier.gini(fourier.fourier_norms(neuron_to_logit(model), p))
    out["total_squared_weights"] = float(sum(w.detach().double().pow(2).sum() for w in model.parameters()))
    return out


def progress_over_training(model: nn.Module, history: dict[str, Any], keys: list[int]) -> dict[str, list]:
    """Progress measures at every snapshot of a training history (``history["snapshots"]``),
    against the final model's key frequencies; ``model`` is reused to load each snapshot."""
    final = {k: v.clone() for k, v in model.state_dict().items()}
    series: dict[str, list] = {"step": list(history["step"])}
    try:
        for state in history["snapshots"]:
            model.load_state_dict(state)
            for name, value in progress_measures(model, keys).items():
                series.setdefault(name, []).append(value)
    finally:
        model.load_state_dict(final)
    series["phases"] = grokking_phases.detect_series(series, model.cfg.p)["boundaries"]
    return series


# ------------------------------------------------------------------------------ shipping


def train_and_ship(out_dir: Any, log: Any = print, quick: bool = False) -> list:
    """``mechscope train grokking``: train by the recipe, write the checkpoint and, beside it,
    a JSON history with the progress measures at every snapshot (against the final keys)."""
    cfg = grokking.quick_config() if quick else grokking.GrokkingConfig()
    model, hist = grokking.train_grokking(cfg, log=log)
    return ship(model, hist, out_dir, log)


def ship(model: nn.Module, hist: dict[str, Any], out_dir: Any, log: Any = print) -> list:
    """Write a trained model as ``grokking_p{p}.safetensors`` and its progress measures as ``.json``."""
    path = Path(out_dir) / f"grokking_p{model.cfg.p}.safetensors"
    grokking.save(path, model)
    keys = key_frequencies(model)
    series = progress_over_training(model, hist, keys["agreed"])
    record = {"config": model.cfg.to_dict(), "key_frequencies": keys, "progress": series,
              "final": progress_measures(model, keys["agreed"]),
              **{k: hist[k] for k in ("grokked_step", "grokked_seconds", "seconds", "steps_per_second")}}
    save_json_atomic(path.with_suffix(".json"), record)
    log(f"grokking p={model.cfg.p}: {hist['steps_per_second']:.1f} steps/s; test accuracy 0.999 at step "
        f"{hist['grokked_step']} ({hist['grokked_seconds'] or float('nan'):.0f}s); key frequencies {keys['agreed']}")
    return [path, path.with_suffix(".json")]


def train_and_ship_quick(out_dir: Any, log: Any = print) -> list:
    """``mechscope train grokking_quick``: the p = 53 test variant."""
    return train_and_ship(out_dir, log, quick=True)
