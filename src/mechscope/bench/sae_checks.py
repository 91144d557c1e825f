"""Bench checks of sparse dictionaries: ground truth, CE loss recovered, causal scoring.

Thresholds are the issue's (and the spec's reference run), written here before the
checks first ran:

- **synthetic ground truth** (spec §6 reference: d 256, 512 features, L0 5; TopK, 1024
  latents, k 5): with AuxK, MMCS >= 0.99. Without AuxK it reaches less: the spec's
  reference run measures 0.818 against 0.999, so the gain from AuxK is registered as
  >= 0.05 and the no-AuxK MMCS itself is reported without a criterion. (The world's
  directions are seeded apart from the dictionary's initialisation: drawn from the same
  stream, the first 512 decoder rows started equal to the true features, MMCS 1 at step 0.)
- **toy worlds** (induction residual stream, grokking MLP neurons): CE loss recovered
  >= 0.90 at L0 <= 32, for TopK and for JumpReLU.
- **causal scoring** (hierarchical equality, hidden layer 0): IIA of SAE features, found by
  the same search and masking used for neurons, beside DAS, the best neurons and the
  random subspace. The issue asks where SAE features land, not for a threshold: the rows
  are reported without one.

The default run scores the shipped dictionaries (trained by ``mechscope train
sae_synthetic`` / ``sae_toy_worlds`` at the published settings) and trains only the small
causal-table SAE; ``--full`` retrains everything in the run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from mechscope.bench import Result, check
from mechscope.bench.sae_causal import score_features, train_site_sae
from mechscope.causal.compare import SearchSettings, compare
from mechscope.causal.das import FitConfig
from mechscope.core.run import cache
from mechscope.sae.arch import SAEConfig
from mechscope.sae.evals import (
    cosine_matrix,
    density_histogram,
    evaluate,
    matched_correlation,
    mmcs,
    recovered_fraction,
)
from mechscope.sae.featurizer import SAEFeaturizer
from mechscope.sae.io import load_sae, read_sae_metadata
from mechscope.sae.train import TrainConfig
from mechscope.tasks import (
    hierarchical_equality as he,
    price_tagging as pt,
    sae_synthetic as recipes,
    sae_worlds as worlds,
)
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures

SYN = "synthetic_features"
HE = "hierarchical_equality"


# -- synthetic ground truth --------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _synthetic(full: bool) -> dict[str, Any]:
    """Both reference dictionaries: shipped (default) or retrained (``--full``), with scores."""
    out = {}
    for name, auxk in (("auxk", True), ("no_auxk", False)):
        if full:
            result, world, _ = recipes.train_synthetic(auxk)
            sae, history, source = result.sae, result.history, "retrained in this run"
        else:
            path = recipes.CHECKPOINTS / recipes.SYNTHETIC_FILES[name]
            sae, meta = load_sae(path), read_sae_metadata(path)
            world = SyntheticFeatures(SyntheticConfig.from_dict(meta["world"]))
            history, source = meta["history"], f"shipped {path.name} (fp16 weights)"
        out[name] = {"sae": sae, "world": world, "history": history, "source": source}
    return out


def _cosines(entry: dict[str, Any]) -> torch.Tensor:
    return cosine_matrix(entry["world"].features, entry["sae"].W_dec).max(dim=1).values  # [n_features]


def _synthetic_rows(entry: dict[str, Any]) -> dict[str, float]:
    w, truth = entry["sae"].W_dec, entry["world"].features
    last = entry["history"][-1]
    return {"mmcs": mmcs(truth, w), "mcc": matched_correlation(truth, w), "recovered_fraction": recovered_fraction(truth, w),
            "dead_fraction": float(last["dead"]), "fvu": float(last["fvu"]), "l0": float(last["l0"])}


def _synthetic_figures(ctx: Any, res: dict[str, Any]) -> None:
    with ctx.figure("mmcs_during_training", caption="Synthetic ground truth (d 256, 512 features, L0 5): MMCS of a "
                    "2x overcomplete TopK SAE (k 5) during training, with and without AuxK; dashed: 0.99") as fig:
        ax = fig.add_subplot()
        for name, label in (("auxk", "TopK + AuxK"), ("no_auxk", "TopK, no AuxK")):
            h = res[name]["history"]
            ax.plot([e["step"] for e in h if "mmcs" in e], [e["mmcs"] for e in h if "mmcs" in e], label=label)
        ax.axhline(0.99, ls="--", c="g", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("MMCS")
        ax.legend()
    with ctx.figure("best_cosine_per_feature", caption="Best cosine of each ground-truth feature with any decoder "
                    "row (sorted), with and without AuxK; dotted: 0.9, the 'recovered' cut") as fig:
        ax = fig.add_subplot()
        for name, label in (("auxk", "TopK + AuxK"), ("no_auxk", "TopK, no AuxK")):
            ax.plot(_cosines(res[name]).sort(descending=True).values.tolist(), label=label)
        ax.axhline(0.9, ls=":", c="k", lw=0.8)
        ax.set_xlabel("ground-truth feature (sorted)")
        ax.set_ylabel("max cosine")
        ax.legend()


_SYN_EXTRA = {"mcc": None, "recovered_fraction": None, "dead_fraction": None, "fvu": None, "l0": None}


@check(SYN, "topk_auxk", "mmcs", threshold=(">=", 0.99), other_metrics=_SYN_EXTRA,
       description="2x overcomplete TopK SAE (1024 latents, k 5) with AuxK on 512 known directions in d 256 "
                   "(L0 5): mean max cosine of each true feature with the decoder")
def synthetic_topk_auxk(ctx) -> list[Result]:
    res = _synthetic(ctx.full)
    _synthetic_figures(ctx, res)
    return _metric_rows(res["auxk"], ctx.full)


@check(SYN, "topk_no_auxk", "mmcs", threshold=None,
       other_metrics={"mmcs_gain_from_auxk": (">=", 0.05), **_SYN_EXTRA},
       description="the same SAE without AuxK (the contrast is part of the result; spec reference 0.82 vs 0.999)")
def synthetic_topk_no_auxk(ctx) -> list[Result]:
    res = _synthetic(ctx.full)
    rows = _metric_rows(res["no_auxk"], ctx.full)
    with_auxk, without = _synthetic_rows(res["auxk"])["mmcs"], rows[0].value
    rows.append(Result(with_auxk - without, metric="mmcs_gain_from_auxk",
                       detail={"with_auxk": with_auxk, "without_auxk": without}))
    return rows


@check(SYN, "topk_untied", "mmcs", threshold=None, full_only=True,
       other_metrics={"mmcs_with_auxk": None, "dead_fraction_without_auxk": None, "dead_fraction_with_auxk": None},
       description="ablation (reported, --full only): the same two SAEs with an encoder started at random "
                   "directions instead of W_dec^T (the tied start of OpenAI, sparsify, SAELens and dictionary_learning)")
def synthetic_topk_untied(ctx) -> list[Result]:
    scores = {auxk: recipes.train_synthetic(auxk, tied_init=False)[2] for auxk in (False, True)}
    detail = {"setting": "full", "init": "untied", "d_sae": 1024, "k": 5, "steps": 3000}
    return [Result(scores[False]["mmcs"], detail=detail),
            Result(scores[True]["mmcs"], metric="mmcs_with_auxk", detail=detail),
            Result(scores[False]["dead"], metric="dead_fraction_without_auxk", detail=detail),
            Result(scores[True]["dead"], metric="dead_fraction_with_auxk", detail=detail)]


def _metric_rows(entry: dict[str, Any], full: bool) -> list[Result]:
    scores = _synthetic_rows(entry)
    detail = {"source": entry["source"], "setting": "full" if full else "shipped", "d": 256, "n_features": 512,
              "d_sae": 1024, "k": 5, "steps": int(entry["history"][-1]["step"])}
    return [Result(scores["mmcs"], detail=detail)] + [Result(v, metric=k, detail=detail) for k, v in scores.items()
                                                       if k != "mmcs"]


# -- toy worlds: CE loss recovered --------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _toy(world: str, arch: str, full: bool) -> dict[str, Any]:
    if full:
        w = worlds.load_world(world)
        result = worlds.train_toy_sae(w, arch)
        sae, history, source = result.sae, result.history, "retrained in this run"
    else:
        sae, meta = worlds.load_shipped(world, arch)
        w = worlds.load_world(world, meta["model_file"])
        history, source = meta["history"], f"shipped {worlds.checkpoint_name(world, arch)}"
    with torch.no_grad():
        rows = [cache(w.model, b, [w.site])[w.site].reshape(-1, sae.d_in) for b in w.eval_batches]
    density = density_histogram(evaluate(sae, rows)["density"])
    return {"scores": worlds.score(w, sae), "history": history, "source": source, "model_file": w.model_file,
            "site": str(w.site), "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.cfg.k, "arch": arch, "density": density}


def _toy_rows(ctx: Any, world: str, arch: str) -> list[Result]:
    res = _toy(world, arch, ctx.full)
    s = res["scores"]
    detail = {k: res[k] for k in ("source", "model_file", "site", "d_in", "d_sae")}
    detail.update(setting="full" if ctx.full else "shipped", l0_target=res["k"], n_positions=s["n_positions"],
                  dead_on_eval=res["density"]["dead"],
                  ce_clean=s["ce_clean"], ce_zero_ablation=s["ce_zero_ablation"], ce_spliced=s["ce_spliced"])
    with ctx.figure(f"training_{arch}", caption=f"{world}: {arch} SAE training, FVU and L0 per step") as fig:
        ax = fig.add_subplot()
        steps = [e["step"] for e in res["history"]]
        ax.plot(steps, [e["fvu"] for e in res["history"]], label="FVU (batch)")
        ax.set_xlabel("step")
        ax.set_ylabel("FVU")
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(steps, [e["l0"] for e in res["history"]], c="C1", label="L0")
        ax2.set_ylabel("L0")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
    h = res["density"]
    with ctx.figure(f"density_{arch}", caption=f"{world}: {arch} SAE, log10 feature density on the evaluation "
                    f"inputs ({h['dead']} latents never active there)") as fig:
        ax = fig.add_subplot()
        edges = h["edges"]
        ax.bar(edges[:-1], h["counts"], width=edges[1] - edges[0], align="edge", color="#4a7")
        ax.set_xlabel("log10 density (fraction of tokens on which the latent fires)")
        ax.set_ylabel("latents")
    base = {"zero_ablation": 0.0}
    return [Result(s["ce_loss_recovered"], baselines=base, detail=detail),
            Result(s["l0"], metric="l0", detail=detail),
            Result(s["kl_score"], metric="kl_score", detail=detail),
            Result(s["delta_loss"], metric="delta_loss", detail=detail),
            Result(s["fvu"], metric="fvu", detail=detail)]


_TOY_EXTRA = {"l0": ("<=", 32), "kl_score": None, "delta_loss": None, "fvu": None}


def _register_toy(world: str, arch: str, what: str) -> None:
    @check(world, f"sae_{arch}", "ce_loss_recovered", threshold=(">=", 0.90), other_metrics=_TOY_EXTRA,
           baselines={"zero_ablation": "the site zeroed (0 by definition)"},
           description=f"{arch} SAE on {what}, spliced into the model: (CE_zero - CE_sae) / (CE_zero - CE_clean), "
                       "with L0 on the same inputs")
    def toy_check(ctx) -> list[Result]:
        return _toy_rows(ctx, world, arch)


for _world, _what in (("induction", "the 2-layer induction model's residual stream after layer 0"),
                      ("grokking", "the modular-addition model's MLP neurons")):
    for _arch in ("topk", "jumprelu"):
        _register_toy(_world, _arch, _what)


# -- causal scoring: SAE features beside DAS and neurons -----------------------------------
HE_SAE = dict(d_sae=64, k=4, steps=2000, batch_size=1024)  # 4x the 16 hidden units, a quarter of them active


@functools.lru_cache(maxsize=2)
def _he_table(seed: int, full: bool) -> dict[str, Any]:
    """IIA at hidden layer 0 of DAS, neurons (search and masking), SAE features (same), random subspace."""
    n_train, n_test = (50_000, 4000) if full else (10_000, 1000)
    fit = FitConfig(epochs=20 if full else 10, seed=seed)
    search = SearchSettings(n=1000, sizes=tuple(range(1, 9))) if full else SearchSettings(n=200, sizes=(1, 2, 4, 8))
    model = he.train(he.TrainConfig(seed=seed), log=lambda *a: None)[0] if full else he.load_model()
    site = he.site(0)
    train_sets = {w: he.counterfactuals(n_train, 7000 + 10 * seed + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    tests = {w: he.counterfactuals(n_test, 7100 + 10 * seed + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    table = compare(model, train_sets, tests, site, he.VARIABLES, 8, ("das", "neurons", "dbm"), fit=fit, search=search)
    sample = lambda n, gen: he.to_model_inputs(he.sample(n, gen))  # noqa: E731 - the task's input distribution
    sae_cfg = SAEConfig(d_in=16, d_sae=HE_SAE["d_sae"], arch="topk", k=HE_SAE["k"])
    trained = train_site_sae(model, sample, site, sae_cfg, TrainConfig(steps=HE_SAE["steps"], batch_size=HE_SAE["batch_size"],
                                                                       progress=False, seed=seed), seed=seed)
    sae_res = score_features(model, SAEFeaturizer(trained.sae), train_sets, tests, site, he.VARIABLES, search, fit)
    table.update({"sae_search": sae_res["search"], "sae_dbm": sae_res["dbm"]})
    return {"table": table, "tests": list(tests), "sae_fvu": trained.history[-1]["fvu"], "sae_l0": trained.history[-1]["l0"],
            "setting": "full" if full else "reduced", "n_train": 3 * n_train, "n_test": n_test}


def _he_figure(ctx: Any, res: dict[str, Any]) -> None:
    order = ("das", "sae_search", "sae_dbm", "neurons", "dbm", "random_subspace")
    labels = ("DAS (8-d)", "SAE features\n(search)", "SAE features\n(masking)", "neurons\n(search)",
              "neurons\n(masking)", "random\nsubspace")
    with ctx.figure("iia_by_basis", caption="Hierarchical equality, hidden layer 0: IIA on held-out counterfactuals "
                    "(WX, YZ, both) of alignments in each basis") as fig:
        ax = fig.add_subplot()
        width = 0.8 / len(res["tests"])
        for j, name in enumerate(res["tests"]):
            vals = [res["table"][m].iia[name].value if name in res["table"][m].iia else 0.0 for m in order]
            ax.bar([i + j * width for i in range(len(order))], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(order))], labels, fontsize=7)
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("IIA")
        ax.legend(fontsize=7)


def _he_rows(ctx: Any, method: str) -> list[Result]:
    """One IIA row per variable, then where the SAE features land between neurons and DAS.

    ``landing`` = (IIA_sae − IIA_neurons) / (IIA_DAS − IIA_neurons), averaged over the
    variables: 0 at the neurons found the same way (search for search, masking for
    masking), 1 at DAS, negative below the neurons.
    """
    res = _he_table(ctx.seed, ctx.full)
    t = res["table"]
    ref = "best_neurons" if method == "sae_search" else "neurons_masking"
    rows, landings = [], []
    for name, r in t[method].iia.items():
        base = {"das": t["das"].iia[name].value, "best_neurons": t["neurons"].iia[name].value,
                "neurons_masking": t["dbm"].iia[name].value, "random_subspace": t["random_subspace"].iia[name].value}
        spread = base["das"] - base[ref]
        landing = (r.value - base[ref]) / spread if spread > 0 else None
        if landing is not None:
            landings.append(landing)
        rows.append(Result(r.value, baselines=base, detail={
            "layer": 0, "variable": name, "n_pairs": r.n_pairs, "kept": r.kept, "setting": res["setting"],
            "features": t[method].info["features"], "sae": {**HE_SAE, "fvu": res["sae_fvu"], "l0": res["sae_l0"]},
            "neuron_reference": ref, "position_between_neurons_and_das": landing}))
    if landings:
        rows.append(Result(sum(landings) / len(landings), metric="landing_between_neurons_and_das", detail={
            "neuron_reference": ref, "per_variable": dict(zip(t[method].iia, landings)),
            "meaning": "0: at the neurons found the same way, 1: at DAS (mean over variables)"}))
    return rows


_HE_BASELINES = {"das": "DAS, 8 dims per variable", "best_neurons": "best neuron set found by the same search",
                 "neurons_masking": "DBM over neurons", "random_subspace": "random 8-d subspace per variable"}


_HE_EXTRA = {"landing_between_neurons_and_das": None}


@check(HE, "sae_search", "iia", threshold=None, baselines=_HE_BASELINES, other_metrics=_HE_EXTRA,
       description="SAE features (TopK, 64 latents, k 4, error term added back) at hidden layer 0, sets found by the "
                   "neuron search; reported beside DAS and neurons (no threshold: the issue asks where they land)")
def he_sae_search(ctx) -> list[Result]:
    _he_figure(ctx, _he_table(ctx.seed, ctx.full))
    return _he_rows(ctx, "sae_search")


@check(HE, "sae_dbm", "iia", threshold=None, baselines=_HE_BASELINES, other_metrics=_HE_EXTRA,
       description="SAE features at hidden layer 0, sets found by differentiable binary masking over the latents")
def he_sae_dbm(ctx) -> list[Result]:
    return _he_rows(ctx, "sae_dbm")


# -- causal scoring on the small price-tagging transformer (--full only) ----------------------
PT = "price_tagging"


@functools.lru_cache(maxsize=2)
def _pt_table(seed: int, n_train: int = 20_000, n_test: int = 4000, epochs: int = 20, search_n: int = 1000,
              sae_steps: int = 2000, retrain: bool = True) -> dict[str, Any]:
    """Per block's output at the "?" position: Boundless DAS, neurons and SAE features for L = [Z >= X].

    The defaults are the published sizes (``--full``); smaller ones give a quick smoke run.
    """
    model = pt.train(pt.TrainConfig(seed=seed), log=lambda *a: None)[0] if retrain else pt.load_model()
    fit, search = FitConfig(epochs=epochs, batch_size=256, seed=seed), SearchSettings(n=search_n, sizes=(1, 2, 4, 8))
    train_sets = {"L": pt.counterfactuals(n_train, 7300 + seed, "L")}
    tests = {"L": pt.counterfactuals(n_test, 7400 + seed, "L")}
    sample = lambda n, gen: pt.to_model_inputs(pt.sample(n, gen))  # noqa: E731
    layers = {}
    for layer in range(pt.MODEL.n_layers):
        site = pt.site(layer)
        table = compare(model, train_sets, tests, site, ("L",), 8, ("boundless", "neurons"), readout=pt.readout,
                        fit=fit, search=search)
        sae_cfg = SAEConfig(d_in=pt.MODEL.d_model, d_sae=256, arch="topk", k=8)
        trained = train_site_sae(model, sample, site, sae_cfg, TrainConfig(steps=sae_steps, batch_size=1024, progress=False,
                                                                            seed=seed), n_rows=50_000, seed=seed)
        sae_res = score_features(model, SAEFeaturizer(trained.sae), train_sets, tests, site, ("L",), search, fit,
                                 readout=pt.readout)
        table.update({"sae_search": sae_res["search"], "sae_dbm": sae_res["dbm"]})
        layers[layer] = {"table": table, "fvu": trained.history[-1]["fvu"]}
    return layers


@check(PT, "sae_features", "iia", threshold=None, full_only=True,
       baselines={"boundless_das": "Boundless DAS at the same site", "best_neurons": "best neuron set (same search)",
                  "random_subspace": "random subspace of Boundless DAS's size"},
       description="L = [Z >= X] at the '?' position after each block: SAE features (TopK, 256 latents, k 8) found "
                   "by the neuron search and by masking, beside Boundless DAS and neurons (reported, --full only)")
def pt_sae_features(ctx) -> list[Result]:
    rows = []
    for layer, entry in _pt_table(ctx.seed).items():
        t = entry["table"]
        base = {"boundless_das": t["boundless"].iia["L"].value, "best_neurons": t["neurons"].iia["L"].value,
                "random_subspace": t["random_subspace"].iia["L"].value}
        for method in ("sae_search", "sae_dbm"):
            rows.append(Result(t[method].iia["L"].value, baselines=base, detail={
                "layer": layer, "position": "?", "variable": "L", "found_by": method, "sae_fvu": entry["fvu"],
                "features": t[method].info["features"]}))
    return rows
