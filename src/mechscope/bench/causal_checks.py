"""Bench checks of causal abstraction: IIA of every alignment method on tasks with known answers.

Thresholds are the issue's, written here before the checks first ran:

- hierarchical equality (DAS paper): the network reaches test accuracy >= 0.99 on unseen
  vectors; at the first hidden layer DAS with 8 dimensions per variable reaches IIA
  >= 0.95 for WX, for YZ and for both; the best neuron-aligned alignment found stays
  <= 0.80; the random 8-d subspace stays at least 0.20 below DAS.
- price tagging (Boundless DAS paper, small): Boundless DAS over the residual stream
  finds the left boundary (Z >= X) with IIA >= 0.90 at its best layer and position.

Added by issue 18 (2026-12-06), after the values were known (each says so in its row):
every other method at hidden layer 0 is compared with low-rank DAS on the same test pairs
(``das_minus_iia``, with a paired-bootstrap interval): the full rotation and Boundless
DAS come within 0.05 of it, masking over neurons and search over principal components
stay at least 0.05 below it (MIB); and the neuron search must find the split of a
network whose variables *are* neuron-aligned (``tasks/neuron_aligned_equality.py``),
so that "neurons stay low" is a property of the trained network, not of a weak search.
Price tagging's best layer and position are chosen on a validation split and the test
IIA is reported there.

The default run uses the shipped networks and reduced data sizes (``detail.setting``);
``--full`` retrains the networks by their recipes and uses the published sizes.

The measurements behind these choices (the DAS ceiling of each training seed of the
hierarchical-equality network; where the price-tagging transformer keeps L, and the
networks tried instead) are in ``docs/results.md``: read them before changing a threshold
or the shipped networks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from mechscope.bench import Criterion, Result, Threshold, amended, check
from mechscope.bench.iia_contrast import contrasts
from mechscope.causal.baselines import random_subspace
from mechscope.causal.boundless import boundless_das
from mechscope.causal.compare import MethodResult, SearchSettings, compare
from mechscope.causal.das import FitConfig
from mechscope.causal.iia import iia
from mechscope.tasks import hierarchical_equality as he
from mechscope.tasks import neuron_aligned_equality as aligned
from mechscope.tasks import price_tagging as pt

HE = "hierarchical_equality"
HE_LAYER, HE_DIMS = 0, 8
_PLOT_ORDER = ("das", "rotation", "boundless", "dbm", "neurons", "pca", "random_subspace", "full_vector")
_STYLE = {"rotation": dict(ls="--", marker="x"), "random_subspace": dict(ls=":"), "full_vector": dict(ls=":")}
ISSUE_18 = "2026-12-06"
NO_CRITERION = amended(None, "the row had no criterion; issue 18 gives every method row one from the published "
                       "claims (causal_abstraction.md, hypotheses.md)", ISSUE_18)

SRC_DAS = ("causal_abstraction.md: Geiger et al. 2024 (DAS, arXiv 2303.02536), hierarchical equality: DAS at the "
           "first hidden layer, 8 dims per variable, IIA ~1.00 (pyvene tutorial 0.97)")
SRC_NEURONS = ("causal_abstraction.md: Geiger et al. 2024: the best brute-force neuron-aligned alignment reaches "
               "~0.60, the closest localist one ~0.73")
SRC_MIB = ("causal_abstraction.md, hypotheses.md: MIB causal-variable track (Mueller et al. 2025, arXiv 2504.13151) "
           "and RAVEL (Huang et al. 2024): DAS > DBM ~ DBM over PCA ~ DBM over SAE features ~ neurons")
SRC_DAS_FAMILY = ("issue 18 from causal_abstraction.md: the full rotation (DAS, Geiger et al. 2024) and Boundless DAS "
                  "(Wu et al. 2023, arXiv 2305.08809) search a superset of low-rank DAS's alignments")
SRC_CONTROL = ("issue 18: on a network whose variables are neuron-aligned by construction "
               "(tasks/neuron_aligned_equality.py: the interchange of the true units is exact), the same search must "
               "find them")
KNOWN_DAS = ("the shipped seed-0 network's own ceiling: DAS converges to 0.93 there whatever the fit (5 DAS seeds, "
             "both orthogonalisations, 60k examples x 70 epochs); recipe seeds 0-9 give 0.72-0.948, and pyvene itself "
             "reaches 0.944 on the same recipe; the networks that do reach 0.95 are neuron-aligned "
             "(docs/results.md, 2026-11-24; issue 18)")


def _he_settings(full: bool) -> dict[str, Any]:
    methods = ("das", "rotation", "boundless", "dbm", "neurons", "pca")
    if full:
        return dict(n_train=50_000, n_test=4000, fit=FitConfig(epochs=20), methods=methods,
                    search=SearchSettings(n=1000, sizes=tuple(range(1, 9))), layers=(0, 1, 2))
    # 30 epochs (~900 steps): at 10 the DAS loss is still falling (0.39 against a plateau of
    # 0.24) and IIA sits ~0.04 below its converged value; --full converges to the same value
    return dict(n_train=10_000, n_test=1000, fit=FitConfig(epochs=30), methods=methods,
                search=SearchSettings(n=200, sizes=(1, 2, 4, 8)), layers=(0, 1, 2))


def _he_data(seed: int, full: bool) -> tuple[dict, dict]:
    s = _he_settings(full)
    train = {w: he.counterfactuals(s["n_train"], seed * 1000 + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    tests = {w: he.counterfactuals(s["n_test"], seed * 1000 + 100 + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    return train, tests


@functools.lru_cache(maxsize=2)
def hierarchical_equality(seed: int, full: bool) -> dict[str, Any]:
    """Every method at every hidden layer, once per (seed, setting); the checks read from it."""
    s = _he_settings(full)
    if full:
        model, metrics = he.train(he.TrainConfig(seed=seed), log=lambda *a: None)
        accuracy, n_accuracy = metrics["test_accuracy"], he.TrainConfig().n_test
    else:
        model = he.load_model()
        accuracy, n_accuracy = he.accuracy(model, 20_000, seed), 20_000
    train, tests = _he_data(seed, full)
    fit = s["fit"].replace(seed=seed)
    layers = {}
    for layer in s["layers"]:
        layers[layer] = compare(model, train, tests, he.site(layer), he.VARIABLES, HE_DIMS, s["methods"],
                                fit=fit, search=s["search"])
    torch.manual_seed(seed)  # the untrained baseline: the same architecture at a fresh initialisation
    untrained = he.accuracy(he.build_model().eval(), n_accuracy, seed)
    return {"accuracy": accuracy, "n_accuracy": n_accuracy, "untrained_accuracy": untrained, "layers": layers,
            "model": model, "test_sets": tests, "tests": list(tests), "setting": "full" if full else "reduced",
            "n_train": 3 * s["n_train"], "n_test": s["n_test"]}


@functools.lru_cache(maxsize=2)
def neuron_control(seed: int, full: bool) -> dict[str, Any]:
    """The neuron search of the row, with its data and settings, on the neuron-aligned network."""
    s = _he_settings(full)
    net = aligned.build(seed)
    train, tests = _he_data(seed, full)
    table = compare(net.model, train, tests, he.site(HE_LAYER), he.VARIABLES, HE_DIMS, ("neurons",), search=s["search"])
    return {"table": table, "truth": net.neurons, "search_n": s["search"].n, "sizes": list(s["search"].sizes)}


def _he_figure(ctx: Any, res: dict[str, Any]) -> None:
    with ctx.figure("iia_per_layer", caption="Hierarchical equality: IIA (mean over the WX, YZ and both test sets; "
                    "full vector: WX and YZ) per hidden layer for every method, 8 dimensions per variable "
                    "(8 + 8 fill the 16-unit layer, so DAS and the full rotation coincide). "
                    "Dashed: DAS threshold 0.95 and neuron ceiling 0.80.") as fig:
        ax = fig.add_subplot()
        layers = sorted(res["layers"])
        for method in _PLOT_ORDER:
            xs = [l for l in layers if method in res["layers"][l]]
            if xs:
                style = {"marker": "o", **_STYLE.get(method, {})}
                ax.plot(xs, [res["layers"][l][method].mean() for l in xs], label=method, **style)
        ax.axhline(0.95, ls="--", c="g", lw=0.8)
        ax.axhline(0.80, ls="--", c="r", lw=0.8)
        ax.set_xlabel("hidden layer")
        ax.set_ylabel("IIA")
        ax.set_xticks(layers)
        ax.set_ylim(0.4, 1.02)
        ax.legend(fontsize=7)


def _rows(res: dict[str, Any], method: str, layer: int = HE_LAYER, **extra: Any) -> list[Result]:
    at = res["layers"][layer]
    main: MethodResult = at[method]
    out = []
    for name, r in main.iia.items():
        base = {k: at[k].iia[name].value for k in ("random_subspace", "neurons", "full_vector", "pca")
                if k in at and k != method and name in at[k].iia}
        base = {("best_neurons" if k == "neurons" else k): v for k, v in base.items()}
        out.append(Result.proportion(r.value, r.kept, baselines=base, detail={
            "layer": layer, "dims": HE_DIMS, "variable": name, "n_pairs": r.n_pairs, "kept": r.kept,
            "setting": res["setting"], "n_train": res["n_train"], **extra}))
    return out


def _das_gap_rows(res: dict[str, Any], method: str, baseline: str) -> list[Result]:
    """``das_minus_iia`` per test set: IIA(DAS) − IIA(method) on the same pairs, beside the
    same difference with ``baseline``'s alignment in the method's place."""
    at, model, tests = res["layers"][HE_LAYER], res["model"], res["test_sets"]
    gaps = contrasts(model, tests, at["das"].alignment, at[method].alignment)
    controls = contrasts(model, tests, at["das"].alignment, at[baseline].alignment)
    return [Result(g.value, metric="das_minus_iia", n=g.n, interval=g.interval,
                   baselines={baseline: controls[name].value} if name in controls else {},
                   detail={"layer": HE_LAYER, "variable": name, "das": g.iia_a, method: g.iia_b,
                           "interval": "paired bootstrap over the test pairs", "setting": res["setting"]})
            for name, g in gaps.items()]


@check(HE, "model", "test_accuracy", threshold=(">=", 0.99), kind="finding", source=SRC_DAS,
       baselines={"untrained_model": "the same MLP at a fresh initialisation"},
       description="the MLP 16-16-16-16-2 classifies hierarchical equality on vectors never seen in training")
def he_model_accuracy(ctx) -> Result:
    res = hierarchical_equality(ctx.seed, ctx.full)
    return Result.proportion(res["accuracy"], res["n_accuracy"], baselines={"untrained_model": res["untrained_accuracy"]},
                             detail={"n_test": res["n_accuracy"], "setting": res["setting"]})


@check(HE, "das", "iia", threshold=(">=", 0.95), kind="finding", source=SRC_DAS, known_cause=KNOWN_DAS,
       baselines={"random_subspace": "random 8-d subspace per variable", "best_neurons": "best neuron-aligned alignment",
                  "full_vector": "whole hidden vector from the source", "pca": "best PCA-component alignment"},
       description="DAS, 8 dims per variable at hidden layer 0, IIA on unseen vectors for WX, YZ and both")
def he_das(ctx) -> list[Result]:
    res = hierarchical_equality(ctx.seed, ctx.full)
    _he_figure(ctx, res)
    info = res["layers"][HE_LAYER]["das"].info
    return _rows(res, "das", fit_seconds=round(res["layers"][HE_LAYER]["das"].seconds, 2), final_loss=info["loss"])


@check(HE, "neuron_search", "iia", threshold=("<=", 0.80), kind="finding", source=SRC_NEURONS,
       known_cause="the interval rule (2026-12-06): the values sit just under 0.80 (0.78-0.79) and about 1000 "
                   "test pairs give a 95 % interval of +-0.026, whose top crosses 0.80; more pairs would settle it",
       other_metrics={"neuron_aligned_control_iia": Criterion.check(">=", 0.95, source=SRC_CONTROL)},
       baselines={"random_subspace": "random 8-d subspace per variable (on the control network for the control rows)"},
       description="best neuron-aligned alignment (exhaustive where feasible, else greedy) at hidden layer 0; and the "
                   "same search, data and settings on a network whose variables are neuron-aligned (control)")
def he_neurons(ctx) -> list[Result]:
    res = hierarchical_equality(ctx.seed, ctx.full)
    info = res["layers"][HE_LAYER]["neurons"].info
    rows = _rows(res, "neurons", search=info["search"], alignments_scored=info["scored"])
    ctl = neuron_control(ctx.seed, ctx.full)
    found = ctl["table"]["neurons"]
    placed = {v: tuple(found.alignment[v].features or ()) for v in he.VARIABLES}
    budget = {"search_examples_per_dataset": ctl["search_n"], "das_examples": res["n_train"], "sizes": ctl["sizes"]}
    for name, r in found.iia.items():
        rows.append(Result.proportion(r.value, r.kept, metric="neuron_aligned_control_iia",
                                      baselines={"random_subspace": ctl["table"]["random_subspace"].iia[name].value},
                                      detail={"layer": HE_LAYER, "variable": name, "n_pairs": r.n_pairs, "kept": r.kept,
                                              "network": "tasks/neuron_aligned_equality.py (hand-built, seed "
                                                         f"{ctx.seed})", "true_neurons": ctl["truth"],
                                              "found_neurons": placed, "found_the_split": placed == ctl["truth"],
                                              "search": found.info["search"], **budget, "setting": res["setting"]}))
    return rows


@check(HE, "random_subspace", "iia_gap", threshold=(">=", 0.20), kind="finding", source=SRC_DAS,
       baselines={"random_subspace": "IIA of the random subspace itself"},
       description="DAS IIA minus the IIA of a random 8-d subspace per variable, hidden layer 0")
def he_random_gap(ctx) -> list[Result]:
    res = hierarchical_equality(ctx.seed, ctx.full)
    at = res["layers"][HE_LAYER]
    gaps = contrasts(res["model"], res["test_sets"], at["das"].alignment, at["random_subspace"].alignment)
    return [Result(g.value, n=g.n, interval=g.interval, baselines={"random_subspace": g.iia_b},
                   detail={"layer": HE_LAYER, "dims": HE_DIMS, "variable": name, "das": g.iia_a,
                           "interval": "paired bootstrap over the test pairs", "setting": res["setting"]})
            for name, g in gaps.items()]


def _compared_check(method: str, op: str, baseline: str, source: str, description: str, kind: str = "finding",
                    known_cause: str = "") -> None:
    """Register ``method``'s IIA rows (info) and its ``das_minus_iia`` rows (the criterion)."""
    def run(ctx) -> list[Result]:
        res = hierarchical_equality(ctx.seed, ctx.full)
        info = res["layers"][HE_LAYER][method].info
        rows = _rows(res, method, **{k: v for k, v in info.items() if k in ("dims", "search", "loss")})
        return rows + _das_gap_rows(res, method, baseline)
    run.__name__ = f"he_{method}"
    gap = Criterion(Threshold(op, 0.05), kind, source=source, known_cause=known_cause, amended_from=NO_CRITERION,
                    after_observation=True)
    check(HE, method, "iia", threshold=None, other_metrics={"das_minus_iia": gap},
          baselines={baseline: f"das_minus_iia with the {baseline.replace('_', ' ')} in the method's place"},
          description=description)(run)


# 8 + 8 coordinates fill the 16 units, so the full rotation is low-rank DAS's own model (the same
# basis, seed and fit): only a bug can separate them, which makes this comparison a check here
_compared_check("rotation", "<=", "random_subspace", SRC_DAS_FAMILY,
                "full 16-d rotation, 8 coordinates per variable, hidden layer 0 (8 + 8 fill the layer, so it is "
                "low-rank DAS's model: a check); das_minus_iia <= 0.05", kind="check")
_compared_check("boundless", "<=", "random_subspace", SRC_DAS_FAMILY,
                "Boundless DAS (learned boundary) per variable, hidden layer 0; das_minus_iia <= 0.05",
                known_cause="not established; what is known: Boundless DAS is fitted per variable on that variable's "
                            "own counterfactuals (causal.compare.run_method), never on the two-source 'both' set, where "
                            "it falls furthest below DAS (docs/results.md, 2026-12-06)")
_compared_check("pca", ">=", "rotation", SRC_MIB,
                "best alignment to principal components (search as for neurons), hidden layer 0; DAS above it "
                "by >= 0.05")
_compared_check("dbm", ">=", "rotation", SRC_MIB,
                "differentiable binary masking over neurons, hidden layer 0; DAS above it by >= 0.05")


# -- price tagging ------------------------------------------------------------------------
PT = "price_tagging"
SRC_PT = ("causal_abstraction.md: Wu et al. 2023 (Boundless DAS, arXiv 2305.08809): Alpaca-7B keeps the left "
          "boundary L = [Z >= X], IIA ~0.96; here the same shape of task on a small transformer trained by this project")
KNOWN_PT = ("the shipped transformer does not keep L apart from the answer: at the last position after the final block "
            "Boundless DAS finds the answer O itself, after block 0 there is no L (~0.54); longer fits reach 0.80, and "
            "other small networks tried reach 0.78-0.81 at the last position (docs/results.md, 2026-11-24); "
            "Alpaca-7B's 0.96 is a 7B model's")


def _pt_sizes(full: bool) -> tuple[int, int, int]:
    """Counterfactual pairs for training, validation (choosing the cell) and test (scoring it)."""
    return (20_000, 4000, 4000) if full else (5000, 1000, 1000)


@functools.lru_cache(maxsize=2)
def price_tagging(seed: int, full: bool) -> dict[str, Any]:
    """Boundless DAS for L (and, with --full, R) at every layer and position of the residual stream,
    each cell scored on a validation and a test split, with the random subspace of its size."""
    if full:
        model, metrics = pt.train(pt.TrainConfig(seed=seed), log=lambda *a: None)
    else:
        model = pt.load_model()
    n_train, n_val, n_test = _pt_sizes(full)
    fit = FitConfig(epochs=20 if full else 10, batch_size=256, seed=seed)
    grid: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for variable in (("L", "R") if full else ("L",)):
        train = pt.counterfactuals(n_train, seed * 1000 + 1, variable)
        test = pt.counterfactuals(n_test, seed * 1000 + 2, variable)
        val = pt.counterfactuals(n_val, seed * 1000 + 3, variable)
        grid[variable] = {}
        for layer in range(pt.MODEL.n_layers):
            for pos in range(pt.SEQ):
                site = pt.site(layer, pos)
                al, res = boundless_das(model, train, site, pt.readout, cfg=fit)
                k = al[variable].size
                rand = random_subspace({variable: site}, {variable: k}, {site: pt.MODEL.d_model}, seed)
                grid[variable][(layer, pos)] = {
                    "iia": iia(model, test, al, pt.readout), "validation": iia(model, val, al, pt.readout).value,
                    "dims": k, "loss": res.losses[-1], "random": iia(model, test, rand, pt.readout).value}
    torch.manual_seed(seed)  # the untrained baseline: the same architecture at a fresh initialisation
    untrained = pt.accuracy(pt.build_model().eval())
    return {"accuracy": pt.accuracy(model), "untrained_accuracy": untrained, "grid": grid,
            "setting": "full" if full else "reduced", "n_train": n_train, "n_validation": n_val, "n_test": n_test,
            "positions": pt.POSITIONS, "layers": pt.MODEL.n_layers}


def chosen_cell(grid: dict[tuple[int, int], dict[str, Any]]) -> tuple[int, int]:
    """The (layer, position) with the best *validation* IIA (the first such in layer, position order)."""
    return max(sorted(grid), key=lambda cell: grid[cell]["validation"])


def _pt_figure(ctx: Any, res: dict[str, Any], variable: str) -> None:
    grid, layers, positions = res["grid"][variable], res["layers"], res["positions"]
    best = chosen_cell(grid)
    with ctx.figure(f"iia_layer_position_{variable}", caption=f"Price tagging: Boundless DAS test IIA for "
                    f"{'L = [Z >= X]' if variable == 'L' else 'R = [Z <= Y]'} on the residual stream after each "
                    "block (rows) at each position (columns); the learnt number of dimensions in brackets, "
                    "the random subspace of that size after the slash. Boxed: the cell chosen on the validation "
                    "split, whose test IIA the row reports.") as fig:
        ax = fig.add_subplot()
        values = [[grid[(l, p)]["iia"].value for p in range(len(positions))] for l in range(layers)]
        im = ax.imshow(values, vmin=0.4, vmax=1.0, cmap="viridis")
        for l in range(layers):
            for p in range(len(positions)):
                cell = grid[(l, p)]
                ax.text(p, l, f"{cell['iia'].value:.2f}\n[{cell['dims']}] / {cell['random']:.2f}",
                        ha="center", va="center", fontsize=7, color="w")
        bx, by = best[1], best[0]
        ax.plot([bx - .5, bx + .5, bx + .5, bx - .5, bx - .5], [by - .5, by - .5, by + .5, by + .5, by - .5], c="r", lw=2)
        ax.set_xticks(range(len(positions)), positions)
        ax.set_yticks(range(layers), [f"block {l}" for l in range(layers)])
        fig.colorbar(im, ax=ax, label="IIA")


@check(PT, "model", "accuracy", threshold=(">=", 0.99), kind="finding", source=SRC_PT,
       baselines={"untrained_model": "the same transformer at a fresh initialisation"},
       description="the small transformer answers yes/no correctly on every input (a precondition of the IIA rows)")
def pt_model_accuracy(ctx) -> Result:
    res = price_tagging(ctx.seed, ctx.full)
    return Result.proportion(res["accuracy"], 550, baselines={"untrained_model": res["untrained_accuracy"]},
                             detail={"inputs": "all 550 (X <= Y)", "setting": res["setting"]})


@check(PT, "boundless_das", "iia", threshold=(">=", 0.90), kind="finding", source=SRC_PT, known_cause=KNOWN_PT,
       baselines={"random_subspace": "random subspace of the learnt size, same layer and position"},
       description="Boundless DAS on the residual stream finds L = [Z >= X]: test IIA at the layer and position "
                   "chosen on a validation split")
def pt_boundless(ctx) -> list[Result]:
    res = price_tagging(ctx.seed, ctx.full)
    out = []
    for variable, grid in res["grid"].items():
        _pt_figure(ctx, res, variable)
        layer, pos = chosen_cell(grid)
        cell = grid[(layer, pos)]
        cells = {f"{l}@{res['positions'][p]}": {"validation": round(c["validation"], 4), "test": round(c["iia"].value, 4),
                                               "random_subspace": round(c["random"], 4), "dims": c["dims"]}
                 for (l, p), c in sorted(grid.items())}
        row = Result.proportion(cell["iia"].value, cell["iia"].kept, baselines={"random_subspace": cell["random"]},
                                detail={"variable": variable, "layer": layer, "position": res["positions"][pos],
                                        "chosen_on": f"validation split ({res['n_validation']} pairs)",
                                        "validation_iia": cell["validation"], "dims": cell["dims"], "cells": cells,
                                        "n_pairs": cell["iia"].n_pairs, "kept": cell["iia"].kept,
                                        "setting": res["setting"], "n_train": res["n_train"]})
        if variable == "L":
            out.append(row)
    return out
