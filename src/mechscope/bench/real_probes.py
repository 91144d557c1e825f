"""Probes with controls on the reference real model (issue 20, row 5): token-level properties
of python-docs text, read from the residual stream at every layer.

Fixed before the row first ran:

- **Tokens**: ``N_WINDOWS`` windows of BOS + ``WINDOW - 1`` tokens, one from each of as many
  python-docs files spread evenly over the sorted file list (the second window of each file,
  past its title block); every token but BOS is an example.
- **Properties** (:func:`mechscope.bench.real_text_data.token_property_labels`): the token is
  capitalised (first character an uppercase letter), a digit (only ASCII digits), a
  preposition (a whole word of :data:`~mechscope.bench.real_text_data.PREPOSITIONS`, a list
  written for this row).
- **Probes**: :func:`mechscope.probe.linear.train_probe` (L2 logistic regression, penalty chosen
  on validation) on ``resid_post`` of every block, one split (60/20/20 over tokens) shared by
  the task probe, the control task (Hewitt & Liang 2019: a random label per token id, drawn from
  the real label distribution, :func:`mechscope.probe.control.control_labels`) and shuffled labels.
- **Score**: balanced accuracy (the classes are imbalanced: a digit is a few % of tokens), and
  selectivity = task balanced accuracy - control-task balanced accuracy on the same test tokens.
  The best layer per property is the one with the highest *validation* balanced accuracy of the
  task probe; there, selectivity >= 0.1 (issue 20) is the finding, reproduced when the lower end
  of its bootstrap interval over the test tokens is >= 0.1. Majority (plain accuracy; its
  balanced accuracy is 0.5 by definition) and shuffled labels are reported beside.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.bench import Criterion, Result, check
from mechscope.bench.real_model import REFERENCE, reference_model
from mechscope.bench.real_text_data import (
    PREPOSITIONS,
    PROPERTIES,
    balanced_selectivity,
    best_index,
    spaced_windows,
    token_property_labels,
)
from mechscope.core.aliases import resid_post
from mechscope.core.corpora import corpus_files
from mechscope.core.run import cache
from mechscope.core.stats import bootstrap_interval
from mechscope.core.structure import structure
from mechscope.probe.control import control_labels, shuffled_labels
from mechscope.probe.linear import balanced_accuracy, split_indices, train_probe

ISSUE = "issue 20, row 5 (probes with controls)"
HEWITT = "Hewitt & Liang 2019 (arXiv 1909.03368): control tasks and selectivity"
N_WINDOWS, WINDOW, BATCH = 48, 65, 8
SELECTIVITY = 0.1


def _tokens(ctx: Any, model: Any, tok: Any) -> tuple[Tensor, list[Tensor], Tensor]:
    """``(ids [n], per-layer rows [n, d], labels [n, 3])`` of every token but BOS."""
    windows = spaced_windows(corpus_files("python-docs"), tok, N_WINDOWS, WINDOW)  # [N, WINDOW]
    sites = [resid_post(model, layer) for layer in range(structure(model).n_layers)]
    rows: list[list[Tensor]] = [[] for _ in sites]
    for chunk in windows.split(BATCH):
        with torch.no_grad():
            acts = cache(model, chunk.to(ctx.device), sites)
        for i, site in enumerate(sites):
            rows[i].append(acts[site][:, 1:].reshape(-1, acts[site].shape[-1]).float().cpu())  # BOS left out
    labels = torch.cat([token_property_labels(tok.convert_ids_to_tokens(w[1:].tolist())) for w in windows])
    return windows[:, 1:].reshape(-1), [torch.cat(r) for r in rows], labels


def _layer_scores(x: Tensor, y: dict[str, Tensor], split: list[Tensor]) -> dict[str, Any]:
    """Task, control and shuffled probes at one layer: balanced accuracies per property and the
    test predictions the selectivity interval resamples."""
    _, va, te = split
    out: dict[str, Any] = {}
    for name, labels in y.items():
        fit = train_probe(x, labels, split=split, dtype=torch.float32)
        pred = fit.probe.predict_index(x)  # [n, 3] class indices; the labels are 0/1, so indices are labels
        out[name] = {"val": balanced_accuracy(pred[va], labels[va]).tolist(),
                     "test": balanced_accuracy(pred[te], labels[te]).tolist(),
                     "test_pred": pred[te], "majority": fit.majority_accuracy.tolist(),
                     "accuracy": fit.test_accuracy.tolist()}
    return out


def _property_rows(j: int, name: str, per_layer: list[dict[str, Any]], y: dict[str, Tensor], te: Tensor,
                   seed: int, budget: dict[str, Any]) -> list[Result]:
    best = best_index([s["task"]["val"][j] for s in per_layer])
    s = per_layer[best]
    pair = torch.stack([s["task"]["test_pred"][:, j], y["task"][te, j], s["control"]["test_pred"][:, j],
                        y["control"][te, j]], 1)  # [test, 4]
    sel = float(balanced_selectivity(pair))
    ba = s["task"]["test"][j]
    base = {"control_task": s["control"]["test"][j], "shuffled_labels": s["shuffled"]["test"][j],
            "majority_accuracy": s["task"]["majority"][j]}
    detail = {**budget, "property": name, "best_layer": best, "site": f"resid_post.{best}",
              "positives": int(y["task"][:, j].sum()), "test_positives": int(y["task"][te, j].sum()),
              "per_layer": {k: [p[k]["test"][j] for p in per_layer] for k in ("task", "control", "shuffled")},
              "val_per_layer": [p["task"]["val"][j] for p in per_layer],
              "task_plain_accuracy": s["task"]["accuracy"][j]}
    acc_interval = bootstrap_interval(pair[:, :2], lambda r: balanced_accuracy(r[:, 0].long(), r[:, 1].long())[0],
                                      seed=seed, resamples=1000)
    return [Result(sel, n=len(te), baselines=base, metric=f"{name}_selectivity",
                   interval=bootstrap_interval(pair, balanced_selectivity, seed=seed, resamples=1000),
                   detail={**detail, "interval": "bootstrap over the test tokens (task and control paired)"}),
            Result(ba, n=len(te), baselines=base, metric=f"{name}_balanced_accuracy", interval=acc_interval,
                   detail={**detail, "interval": "bootstrap over the test tokens"})]


_KNOWN = {"digit": "seen on the first run (2026-12-06): Gemma's tokenizer splits numbers into single digits, so the "
                   "property has only 10 token types, and the control task's positives are a few token types that a "
                   "probe memorises as easily as the real ones (control balanced accuracy 0.91 at the chosen layer); "
                   "with 72 digit tokens in the budget (12 in the test split) the interval is also wide"}
_SEL = {p: Criterion.finding(">=", SELECTIVITY, source=f"{ISSUE}: control-task selectivity >= 0.1 at the best layer "
                             f"(chosen on validation); {HEWITT}", known_cause=_KNOWN.get(p, ""))
        for p in PROPERTIES[1:]}
_ACC = {f"{p}_balanced_accuracy": Criterion.info(source=ISSUE + ": balanced accuracy at the best layer")
        for p in PROPERTIES}


@check("real_probes", "linear_probe", "capitalised_selectivity", threshold=(">=", SELECTIVITY), kind="finding",
       source=f"{ISSUE}: control-task selectivity >= 0.1 at the best layer (chosen on validation); {HEWITT}",
       suite="real", other_metrics={**{f"{p}_selectivity": c for p, c in _SEL.items()}, **_ACC},
       baselines={"control_task": "balanced accuracy of the control-task probe (random label per token id)",
                  "shuffled_labels": "balanced accuracy of a probe on shuffled labels",
                  "majority_accuracy": "plain accuracy of the training split's majority class (balanced: 0.5)"},
       description="Gemma-3-270M on python-docs tokens: linear probes for capitalised / digit / preposition at "
                   "every layer; selectivity against a control task at the layer chosen on validation")
def probes_with_controls(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    ids, layers, labels = _tokens(ctx, model, tok)
    split = split_indices(len(ids), (0.6, 0.2, 0.2), seed=ctx.seed)
    y = {"task": labels, "control": control_labels(ids, labels, seed=ctx.seed + 1),
         "shuffled": shuffled_labels(labels, seed=ctx.seed + 2)}
    per_layer = [_layer_scores(x, y, split) for x in layers]
    budget = {"model": REFERENCE, "tokens": len(ids), "windows": N_WINDOWS, "window_tokens": WINDOW - 1,
              "token_types": int(ids.unique().numel()), "split": "60/20/20 over tokens, shared by all probes",
              "sites": f"resid_post.0..{len(layers) - 1}", "prepositions": sorted(PREPOSITIONS),
              "corpus": "python-docs, one window from each of 48 files spread evenly (the second window of each)"}
    rows = [r for j, name in enumerate(PROPERTIES) for r in _property_rows(j, name, per_layer, y, split[2],
                                                                           ctx.seed, budget)]
    with ctx.figure("balanced_accuracy_per_layer", caption="Test balanced accuracy per layer: task probe, control "
                    "task, shuffled labels (chance 0.5); the star marks the layer chosen on validation",
                    figsize=(10.0, 3.4)) as fig:
        _figure(fig, per_layer)
    return rows


def _figure(fig: Any, per_layer: list[dict[str, Any]]) -> None:
    for j, name in enumerate(PROPERTIES):
        ax = fig.add_subplot(1, len(PROPERTIES), j + 1)
        for key, style in (("task", "o-"), ("control", "s--"), ("shuffled", "x:")):
            ax.plot([p[key]["test"][j] for p in per_layer], style, label=key, markersize=3)
        best = best_index([p["task"]["val"][j] for p in per_layer])
        ax.plot([best], [per_layer[best]["task"]["test"][j]], "*", color="#c44", markersize=10)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer (resid_post)", fontsize=8)
        ax.set_ylim(0.4, 1.02)
        if j == 0:
            ax.set_ylabel("balanced accuracy", fontsize=8)
            ax.legend(fontsize=7)
