"""DAS on the reference real model: where the IOI model keeps which name repeated (issue 20, row 6).

The causal model (:mod:`mechscope.bench.real_ioi_das_data`) has one intermediate variable,
``P``: which of the two names the prompt repeats (first or second). Interchanging ``P`` at
the final position from a source prompt with other names changes the answer to the base's
*other* name whenever the two prompts repeat different slots. The network's answer is its
top name among the 40 of the templates at the final position.

Pre-registered before the first run (thresholds from issue 20; DAS as in Geiger et al. 2023,
the IOI task from Wang et al. 2022), with this budget: counterfactual pairs balanced over
(answer, output changed): ``N_TRAIN`` to train, ``N_VAL`` to choose layers, ``N_TEST`` to
score, each kept only where the model names the right name on the base and the source;
DAS with a ``DIMS``-dimensional subspace at the final position of the residual stream after
each of the 18 blocks, ``EPOCHS`` epochs of batches of ``BATCH`` at Adam lr 1e-2 (the
library's default); the ``N_CHOSEN`` layers with the highest validation IIA are scored on the
test pairs:

- DAS IIA >= 0.8 at the layer chosen first (Wilson interval);
- DAS minus a random ``DIMS``-dimensional subspace at that layer >= 0.2 (paired bootstrap on
  the same test pairs);
- beside it, at each chosen layer (information): the random subspace, DBM over neurons (a
  mask over the 640 residual coordinates, trained on the same pairs and epochs) and the
  full-vector interchange (every coordinate at the final position).

Only the positions from the intervened one on are replayed (the suffix engine: the base
run's keys and values for the rest), and the unembedding is cut to the 40 names' rows (the
same logits for those names, checked against the model's own).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.bench import Criterion, Result, check
from mechscope.bench.real_ioi_data import FINAL_POS, N_TOKENS, NAMES, TEMPLATE
from mechscope.bench.real_ioi_das_data import (
    FILLERS,
    ioi_causal_model,
    name_readout,
    sample_inputs,
    to_model_inputs,
    word_ids,
)
from mechscope.bench.real_model import REFERENCE, reference_model
from mechscope.causal.baselines import full_vector, random_subspace
from mechscope.causal.counterfactual import CounterfactualData, make_counterfactuals
from mechscope.causal.das import FitConfig, SubspaceAlignment, fit
from mechscope.causal.dbm import L1, MaskAlignment
from mechscope.causal.engine import SuffixEngine
from mechscope.causal.iia import engine_hits, keep_correct, paired_contrast
from mechscope.core import aliases
from mechscope.core.featurize import Identity
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.core.structure import structure
from mechscope.core.suffix import plan_suffix
from mechscope.core.text import text_batch

ISSUE = "issue 20, row 6 (DAS on a real model)"
GEIGER = "Geiger et al. 2023, 'Finding Alignments Between Interpretable Causal Variables and Distributed " \
         "Neural Representations' (DAS)"
N_TRAIN, N_VAL, N_TEST = 256, 128, 256
DIMS, EPOCHS, BATCH, N_CHOSEN = 4, 10, 32, 3
SEED_OFFSETS = {"train": 1000, "val": 2000, "test": 3000}


def names_only(model: nn.Module, name_ids: Tensor) -> nn.Module:
    """The model with its unembedding cut to the rows of ``name_ids``: a shallow copy sharing
    every other module (a soft-cap after the unembedding acts elementwise, so the names'
    logits are unchanged; :func:`_check_names_only` verifies it)."""
    head = model.get_output_embeddings()
    attr = next((k for k, m in model._modules.items() if m is head), None)
    if attr is None or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s unembedding is not a Linear child of the model; cannot cut it")
    small = nn.Linear(head.in_features, len(name_ids), bias=head.bias is not None)
    small.weight = nn.Parameter(head.weight.detach()[name_ids].clone(), requires_grad=False)
    if head.bias is not None:
        small.bias = nn.Parameter(head.bias.detach()[name_ids].clone(), requires_grad=False)
    view = copy.copy(model)
    view._modules = dict(model._modules)  # its own module table: the original keeps its head
    setattr(view, attr, small.to(head.weight.device))
    return view.eval()


def _check_names_only(model: nn.Module, view: nn.Module, batch: dict[str, Tensor], name_ids: Tensor) -> float:
    with torch.no_grad():
        full = model(**batch, logits_to_keep=1).logits[:, -1].index_select(-1, name_ids)
        cut = view(**batch, logits_to_keep=1).logits[:, -1]
    err = float((full - cut).abs().max())
    if err > 1e-4 * float(full.abs().max()):
        raise RuntimeError(f"the names-only unembedding differs from the model's own logits by {err:.3g}")
    return err


def _check_tokens(tok: Any, ids: dict[str, Tensor], to_inputs: Any) -> None:
    """The slot-built prompts equal the tokenizer's reading of the rendered text."""
    hl = sample_inputs(8, torch.Generator().manual_seed(0))
    built = to_inputs(hl)["input_ids"]
    texts = [TEMPLATE.format(n1=NAMES[int(hl["N1"][i])], n2=NAMES[int(hl["N2"][i])], s2=NAMES[int(hl["S2"][i])],
                             **{s: FILLERS[s][int(hl[s][i])] for s in FILLERS}) for i in range(8)]
    read = text_batch(texts, tok)["input_ids"]
    if read.shape != built.shape or not torch.equal(read, built):
        raise ValueError("the slot-built IOI prompts are not the tokenizer's tokens of the same text")


def _split(ctx: Any, view: nn.Module, to_inputs: Any, readout: Any, name: str, n: int) -> CounterfactualData:
    data = make_counterfactuals(ioi_causal_model(), "P", sample_inputs, n, to_inputs,
                                seed=ctx.seed + SEED_OFFSETS[name], name=name)
    with torch.no_grad():
        return keep_correct(view, data, readout, batch_size=64)


def _runs(view: nn.Module, data: CounterfactualData, anchors: list[Site], sites: list[Site]) -> tuple[Any, dict]:
    """One base run caching every layer (with keys and values), and the sources' views at every site."""
    base = plan_suffix(view, data.base, anchors, [(1, anchors[0]), (len(anchors), anchors[-1])], readout=[N_TOKENS - 1])
    if base.suffix is None:
        raise RuntimeError(f"no suffix replay on the reference model: {base.reason}")
    with torch.no_grad():
        sources = cache(view, data.sources["P"], sites)
    return base, sources


def _engine(view: nn.Module, data: CounterfactualData, run: tuple[Any, dict], site: Site, readout: Any) -> SuffixEngine:
    base, sources = run
    return SuffixEngine(view, data, {"P": site}, readout, base=base, sources={"P": sources[site]})


def _layer_scan(ctx: Any, view: nn.Module, splits: dict, runs: dict, sites: list[Site], readout: Any) -> dict:
    """DAS at every layer on the training pairs, its IIA on the validation pairs."""
    cfg = FitConfig(epochs=EPOCHS, batch_size=BATCH, seed=ctx.seed, engine="suffix")
    out = {}
    for layer, site in enumerate(sites):
        train = _engine(view, splits["train"], runs["train"], site, readout)
        trainable = SubspaceAlignment({"P": site}, {"P": DIMS}, {site: int(train.anchor.shape[-1])}, seed=ctx.seed)
        result = fit(view, splits["train"], trainable, readout, cfg, train)
        alignment = trainable.alignment()
        val = _engine(view, splits["val"], runs["val"], site, readout)
        hits = engine_hits(val, splits["val"].labels, alignment.mixer())
        out[layer] = {"alignment": alignment, "val_iia": float(hits.float().mean()), "seconds": result.seconds,
                      "final_loss": result.losses[-1]}
        ctx.log.info(f"layer {layer}: DAS validation IIA {out[layer]['val_iia']:.3f} ({result.seconds:.0f} s)")
    return out


def _chosen_rows(ctx: Any, view: nn.Module, splits: dict, runs: dict, site: Site, das_alignment: Any,
                 readout: Any) -> dict[str, Tensor]:
    """Test hits [kept] of DAS, a random subspace, DBM over neurons and the full vector at ``site``."""
    width = int(runs["test"][0].acts[Site(site.path, site.io, site.element)].shape[-1])
    cfg = FitConfig(epochs=EPOCHS, batch_size=BATCH, seed=ctx.seed, engine="suffix")
    dbm = MaskAlignment({"P": site}, {"P": Identity(width)}, L1)
    fit(view, splits["train"], dbm, readout, cfg, _engine(view, splits["train"], runs["train"], site, readout))
    test = _engine(view, splits["test"], runs["test"], site, readout)
    alignments = {"das": das_alignment, "random_subspace": random_subspace({"P": site}, {"P": DIMS}, {site: width},
                                                                           seed=ctx.seed),
                  "dbm_neurons": dbm.alignment(), "full_vector": full_vector(site, "P", width)}
    with torch.no_grad():
        return {k: engine_hits(test, splits["test"].labels, a.mixer()) for k, a in alignments.items()}


def _budget(splits: dict) -> dict[str, Any]:
    return {"model": REFERENCE, "variable": "P (which name repeats)", "position": FINAL_POS, "dims": DIMS,
            "epochs": EPOCHS, "batch": BATCH, "lr": FitConfig().lr, "layers_scanned": "all 18 (resid_post)",
            "chosen": N_CHOSEN, **{f"{k}_pairs": f"{len(v)} of {v.meta.get('n_pairs', len(v))} kept"
                                   for k, v in splits.items()}}


@check("real_das", "ioi_position", "iia", threshold=(">=", 0.8), kind="finding", suite="real",
       source=ISSUE + ": DAS IIA >= 0.8 at a layer chosen on validation; " + GEIGER,
       other_metrics={"minus_random_subspace": Criterion.finding(">=", 0.2, source=ISSUE + ": the random subspace "
                                                                 "at least 0.2 below DAS (paired bootstrap)"),
                      "chosen_layer_iia": None, "random_subspace_iia": None, "dbm_neurons_iia": None,
                      "full_vector_iia": None},
       description="Gemma-3-270M on IOI prompts: DAS localises which name repeats at the final position; random "
                   "subspace, DBM over neurons and the full vector beside it at the layers chosen on validation")
def ioi_position(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    ids = word_ids(tok)
    to_inputs = to_model_inputs(ids)
    _check_tokens(tok, ids, to_inputs)
    view = names_only(model, ids["N"].to(ctx.device))
    readout = name_readout(torch.arange(len(NAMES)))
    sample = {k: v.to(ctx.device) for k, v in to_inputs(sample_inputs(8, torch.Generator().manual_seed(1))).items()}
    head_err = _check_names_only(model, view, sample, ids["N"].to(ctx.device))
    splits = {k: _split(ctx, view, to_inputs, readout, k, n)
              for k, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST))}
    n_layers = structure(view).n_layers
    anchors = [aliases.resid_post(view, layer) for layer in range(n_layers)]
    anchors = [Site(a.path, a.io, a.element) for a in anchors]
    sites = [a.replace(positions=(FINAL_POS,)) for a in anchors]
    runs = {k: _runs(view, d, anchors, sites) for k, d in splits.items()}
    scan = _layer_scan(ctx, view, splits, runs, sites, readout)
    chosen = sorted(scan, key=lambda la: (-scan[la]["val_iia"], la))[:N_CHOSEN]
    hits = {la: _chosen_rows(ctx, view, splits, runs, sites[la], scan[la]["alignment"], readout) for la in chosen}
    return _results(ctx, splits, scan, chosen, hits, head_err)


def _results(ctx: Any, splits: dict, scan: dict, chosen: list[int], hits: dict, head_err: float) -> list[Result]:
    budget = {**_budget(splits), "names_only_head_max_error": head_err}
    val = [round(scan[la]["val_iia"], 4) for la in sorted(scan)]
    first = chosen[0]
    h = hits[first]
    n = int(h["das"].numel())
    contrast = paired_contrast(h["das"], h["random_subspace"], seed=ctx.seed)
    rows = [Result.proportion(float(h["das"].float().mean()), n, detail={**budget, "layer": first, "chosen": chosen,
                                                                          "validation_iia_per_layer": val}),
            Result(contrast.value, n=n, interval=contrast.interval, metric="minus_random_subspace",
                   detail={"layer": first, "interval": "paired bootstrap over the test pairs"})]
    for la in chosen:
        for name, metric in (("das", "chosen_layer_iia"), ("random_subspace", "random_subspace_iia"),
                             ("dbm_neurons", "dbm_neurons_iia"), ("full_vector", "full_vector_iia")):
            rows.append(Result.proportion(float(hits[la][name].float().mean()), n, metric=metric,
                                          detail={"layer": la, "validation_iia": scan[la]["val_iia"]}))
    _figure(ctx, val, chosen, hits)
    return rows


def _figure(ctx: Any, val: list[float], chosen: list[int], hits: dict) -> None:
    with ctx.figure("iia_per_layer", caption="DAS IIA for P (which name repeats) at the final position: validation "
                    "IIA at every layer (line); test IIA of DAS and its baselines at the layers chosen (markers)") as fig:
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(range(len(val)), val, "-", color="#446", label="DAS (validation)")
        styles = {"das": ("o", "DAS"), "random_subspace": ("x", "random subspace"), "dbm_neurons": ("s", "DBM neurons"),
                  "full_vector": ("^", "full vector")}
        for name, (marker, label) in styles.items():
            ax.plot(chosen, [float(hits[la][name].float().mean()) for la in chosen], marker, linestyle="none",
                    label=label + " (test)")
        ax.set_xlabel("layer (residual stream after the block)")
        ax.set_ylabel("IIA")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
