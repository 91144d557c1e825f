"""Bench checks of causal abstraction: IIA of every alignment method on tasks with known answers.

Thresholds are the issue's, written here before the checks first ran:

- hierarchical equality (DAS paper): the network reaches test accuracy >= 0.99 on unseen
  vectors; at the first hidden layer DAS with 8 dimensions per variable reaches IIA
  >= 0.95 for WX, for YZ and for both; the best neuron-aligned alignment found stays
  <= 0.80; the random 8-d subspace stays at least 0.20 below DAS.
- price tagging (Boundless DAS paper, small): Boundless DAS over the residual stream at
  the last position finds the left boundary (Z >= X) with IIA >= 0.90 at its best layer.

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

from mechscope.bench import Result, check
from mechscope.causal.baselines import random_subspace
from mechscope.causal.boundless import boundless_das
from mechscope.causal.compare import MethodResult, SearchSettings, compare
from mechscope.causal.das import FitConfig
from mechscope.causal.iia import iia
from mechscope.tasks import hierarchical_equality as he
from mechscope.tasks import price_tagging as pt

HE = "hierarchical_equality"
HE_LAYER, HE_DIMS = 0, 8
_PLOT_ORDER = ("das", "rotation", "boundless", "dbm", "neurons", "pca", "random_subspace", "full_vector")
_STYLE = {"rotation": dict(ls="--", marker="x"), "random_subspace": dict(ls=":"), "full_vector": dict(ls=":")}


def _he_settings(full: bool) -> dict[str, Any]:
    methods = ("das", "rotation", "boundless", "dbm", "neurons", "pca")
    if full:
        return dict(n_train=50_000, n_test=4000, fit=FitConfig(epochs=20), methods=methods,
                    search=SearchSettings(n=1000, sizes=tuple(range(1, 9))), layers=(0, 1, 2))
    # 30 epochs (~900 steps): at 10 the DAS loss is still falling (0.39 against a plateau of
    # 0.24) and IIA sits ~0.04 below its converged value; --full converges to the same value
    return dict(n_train=10_000, n_test=1000, fit=FitConfig(epochs=30), methods=methods,
                search=SearchSettings(n=200, sizes=(1, 2, 4, 8)), layers=(0, 1, 2))


@functools.lru_cache(maxsize=2)
def hierarchical_equality(seed: int, full: bool) -> dict[str, Any]:
    """Every method at every hidden layer, once per (seed, setting); the checks read from it."""
    s = _he_settings(full)
    if full:
        model, metrics = he.train(he.TrainConfig(seed=seed), log=lambda *a: None)
        accuracy = metrics["test_accuracy"]
    else:
        model = he.load_model()
        accuracy = he.accuracy(model, 20_000, seed)
    train = {w: he.counterfactuals(s["n_train"], seed * 1000 + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    tests = {w: he.counterfactuals(s["n_test"], seed * 1000 + 100 + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    fit = s["fit"].replace(seed=seed)
    layers = {}
    for layer in s["layers"]:
        layers[layer] = compare(model, train, tests, he.site(layer), he.VARIABLES, HE_DIMS, s["methods"],
                                fit=fit, search=s["search"])
    return {"accuracy": accuracy, "layers": layers, "tests": list(tests), "setting": "full" if full else "reduced",
            "n_train": 3 * s["n_train"], "n_test": s["n_test"]}


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
        out.append(Result(r.value, baselines=base, detail={
            "layer": layer, "dims": HE_DIMS, "variable": name, "n_pairs": r.n_pairs, "kept": r.kept,
            "setting": res["setting"], "n_train": res["n_train"], **extra}))
    return out


@check(HE, "model", "test_accuracy", threshold=(">=", 0.99),
       description="the MLP 16-16-16-16-2 classifies hierarchical equality on vectors never seen in training")
def he_model_accuracy(ctx) -> Result:
    res = hierarchical_equality(ctx.seed, ctx.full)
    return Result(res["accuracy"], detail={"n_test": 20_000, "setting": res["setting"]})


@check(HE, "das", "iia", threshold=(">=", 0.95),
       baselines={"random_subspace": "random 8-d subspace per variable", "best_neurons": "best neuron-aligned alignment",
                  "full_vector": "whole hidden vector from the source", "pca": "best PCA-component alignment"},
       description="DAS, 8 dims per variable at hidden layer 0, IIA on unseen vectors for WX, YZ and both")
def he_das(ctx) -> list[Result]:
    res = hierarchical_equality(ctx.seed, ctx.full)
    _he_figure(ctx, res)
    info = res["layers"][HE_LAYER]["das"].info
    return _rows(res, "das", fit_seconds=round(res["layers"][HE_LAYER]["das"].seconds, 2), final_loss=info["loss"])


@check(HE, "neuron_search", "iia", threshold=("<=", 0.80),
       baselines={"random_subspace": "random 8-d subspace per variable"},
       description="best neuron-aligned alignment (exhaustive where feasible, else greedy) at hidden layer 0")
def he_neurons(ctx) -> list[Result]:
    res = hierarchical_equality(ctx.seed, ctx.full)
    info = res["layers"][HE_LAYER]["neurons"].info
    return _rows(res, "neurons", search=info["search"], alignments_scored=info["scored"])


@check(HE, "random_subspace", "iia_gap", threshold=(">=", 0.20),
       baselines={"random_subspace": "IIA of the random subspace itself"},
       description="DAS IIA minus the IIA of a random 8-d subspace per variable, hidden layer 0")
def he_random_gap(ctx) -> list[Result]:
    res = hierarchical_equality(ctx.seed, ctx.full)
    at = res["layers"][HE_LAYER]
    out = []
    for name, r in at["das"].iia.items():
        rand = at["random_subspace"].iia[name].value
        out.append(Result(r.value - rand, baselines={"random_subspace": rand},
                          detail={"layer": HE_LAYER, "dims": HE_DIMS, "variable": name, "das": r.value,
                                  "setting": res["setting"]}))
    return out


def _info_check(method: str, description: str) -> None:
    def run(ctx) -> list[Result]:
        res = hierarchical_equality(ctx.seed, ctx.full)
        info = res["layers"][HE_LAYER][method].info
        return _rows(res, method, **{k: v for k, v in info.items() if k in ("dims", "search", "loss")})
    run.__name__ = f"he_{method}"
    check(HE, method, "iia", threshold=None, description=description)(run)


_info_check("rotation", "full 16-d rotation, 8 coordinates per variable, hidden layer 0 (reported, no criterion)")
_info_check("pca", "best alignment to principal components (search as for neurons), hidden layer 0 (reported)")
_info_check("boundless", "Boundless DAS (learned boundary) per variable, hidden layer 0 (reported)")
_info_check("dbm", "differentiable binary masking over neurons, hidden layer 0 (reported)")


# -- price tagging ------------------------------------------------------------------------
PT = "price_tagging"


@functools.lru_cache(maxsize=2)
def price_tagging(seed: int, full: bool) -> dict[str, Any]:
    """Boundless DAS for L (and, with --full, R) at every layer and position of the residual stream."""
    if full:
        model, metrics = pt.train(pt.TrainConfig(seed=seed), log=lambda *a: None)
    else:
        model = pt.load_model()
    n_train, n_test = (20_000, 4000) if full else (5000, 1000)
    fit = FitConfig(epochs=20 if full else 10, batch_size=256, seed=seed)
    grid: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for variable in (("L", "R") if full else ("L",)):
        train = pt.counterfactuals(n_train, seed * 1000 + 1, variable)
        test = pt.counterfactuals(n_test, seed * 1000 + 2, variable)
        grid[variable] = {}
        for layer in range(pt.MODEL.n_layers):
            for pos in range(pt.SEQ):
                site = pt.site(layer, pos)
                al, res = boundless_das(model, train, site, pt.readout, cfg=fit)
                k = al[variable].size
                rand = random_subspace({variable: site}, {variable: k}, {site: pt.MODEL.d_model}, seed)
                grid[variable][(layer, pos)] = {
                    "iia": iia(model, test, al, pt.readout), "dims": k, "loss": res.losses[-1],
                    "random": iia(model, test, rand, pt.readout).value}
    return {"accuracy": pt.accuracy(model), "grid": grid, "setting": "full" if full else "reduced",
            "n_train": n_train, "n_test": n_test, "positions": pt.POSITIONS, "layers": pt.MODEL.n_layers}


def _pt_figure(ctx: Any, res: dict[str, Any], variable: str) -> None:
    grid, layers, positions = res["grid"][variable], res["layers"], res["positions"]
    with ctx.figure(f"iia_layer_position_{variable}", caption=f"Price tagging: Boundless DAS IIA for "
                    f"{'L = [Z >= X]' if variable == 'L' else 'R = [Z <= Y]'} on the residual stream after each "
                    "block (rows) at each position (columns); the learnt number of dimensions in brackets, "
                    "the random subspace of that size after the slash.") as fig:
        ax = fig.add_subplot()
        values = [[grid[(l, p)]["iia"].value for p in range(len(positions))] for l in range(layers)]
        im = ax.imshow(values, vmin=0.4, vmax=1.0, cmap="viridis")
        for l in range(layers):
            for p in range(len(positions)):
                cell = grid[(l, p)]
                ax.text(p, l, f"{cell['iia'].value:.2f}\n[{cell['dims']}] / {cell['random']:.2f}",
                        ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(positions)), positions)
        ax.set_yticks(range(layers), [f"block {l}" for l in range(layers)])
        fig.colorbar(im, ax=ax, label="IIA")


@check(PT, "model", "accuracy", threshold=(">=", 0.99),
       description="the small transformer answers yes/no correctly on every input (a precondition of the IIA rows)")
def pt_model_accuracy(ctx) -> Result:
    res = price_tagging(ctx.seed, ctx.full)
    return Result(res["accuracy"], detail={"inputs": "all 550 (X <= Y)", "setting": res["setting"]})


@check(PT, "boundless_das", "iia", threshold=(">=", 0.90),
       baselines={"random_subspace": "random subspace of the learnt size, same layer and position"},
       description="Boundless DAS on the residual stream at the last position finds L = [Z >= X]; best layer")
def pt_boundless(ctx) -> list[Result]:
    res = price_tagging(ctx.seed, ctx.full)
    out = []
    for variable, grid in res["grid"].items():
        _pt_figure(ctx, res, variable)
        last = {l: grid[(l, len(res["positions"]) - 1)] for l in range(res["layers"])}
        best = max(last, key=lambda l: last[l]["iia"].value)
        cell = last[best]
        row = Result(cell["iia"].value, baselines={"random_subspace": cell["random"]}, detail={
            "variable": variable, "best_layer": best, "position": "last", "dims": cell["dims"],
            "per_layer": {str(l): round(c["iia"].value, 4) for l, c in last.items()},
            "n_pairs": cell["iia"].n_pairs, "kept": cell["iia"].kept, "setting": res["setting"], "n_train": res["n_train"]})
        if variable == "L":
            out.append(row)
    return out
