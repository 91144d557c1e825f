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
  >= 0.90 at L0 <= 32, for TopK and for JumpReLU. (Issue 18, 2026-12-06: a TopK SAE's L0
  cannot exceed its k <= 32 by construction, so its L0 is information; JumpReLU's is not
  bounded and keeps the criterion.)
- **causal scoring** (hierarchical equality, hidden layer 0; price tagging with
  ``--full``): IIA of SAE features, found by the same search and masking used for
  neurons, beside DAS, the best neurons and the random subspace. The IIA itself is
  reported; issue 18 (2026-12-06, after the values were known) adds the published
  ordering as the criterion: DAS above SAE features by >= 0.05 on the same test pairs
  (``das_minus_iia``; MIB: DAS > DBM over SAE features ~ neurons).

The default run scores the shipped dictionaries (trained by ``mechscope train
sae_synthetic`` / ``sae_toy_worlds`` at the published settings) and trains only the small
causal-table SAE; ``--full`` retrains everything in the run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from mechscope.bench import Criterion, Result, amended, check
from mechscope.bench.iia_contrast import contrasts, hits, paired_contrast
from mechscope.bench.sae_causal import HE_SAE, he_table, pt_table
from mechscope.core.run import cache
from mechscope.sae.arch import SAE
from mechscope.sae.evals import (
    cosine_matrix,
    density_histogram,
    evaluate,
    matched_correlation,
    mmcs,
    recovered_fraction,
)
from mechscope.sae.io import load_sae, read_sae_metadata
from mechscope.tasks import (
    price_tagging as pt,
    sae_synthetic as recipes,
    sae_worlds as worlds,
)
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures

SYN = "synthetic_features"
HE = "hierarchical_equality"
ISSUE_18 = "2026-12-06"
SRC_MIB = ("causal_abstraction.md, hypotheses.md: MIB causal-variable track (Mueller et al. 2025, arXiv 2504.13151) "
           "and RAVEL (Huang et al. 2024): DAS > DBM ~ DBM over PCA ~ DBM over SAE features ~ neurons")
_NO_CRITERION = amended(None, "the row had no criterion; issue 18 gives every method row one from the published "
                        "claims (causal_abstraction.md, hypotheses.md)", ISSUE_18)
DAS_ABOVE_SAE = Criterion.finding(">=", 0.05, source=SRC_MIB, after_observation=True, amended_from=_NO_CRITERION)
DAS_ABOVE_SAE_HE = Criterion.finding(">=", 0.05, source=SRC_MIB, after_observation=True, amended_from=_NO_CRITERION,
                                     known_cause="not established; what is known: this table fits its own DAS for 10 "
                                     "epochs (IIA 0.90-0.92), below the 30-epoch 0.93 of the main table, which narrows "
                                     "the gap (docs/results.md, 2026-12-06)")


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


@check(SYN, "topk_auxk", "mmcs", threshold=(">=", 0.99), kind="finding", other_metrics=_SYN_EXTRA,
       source="sae.md §3, reference run: 2x overcomplete TopK with AuxK reaches MMCS 0.999 (>= 0.99)",
       baselines={"untrained_sae": "the same dictionary at its initialisation (step 0, same seed)"},
       description="2x overcomplete TopK SAE (1024 latents, k 5) with AuxK on 512 known directions in d 256 "
                   "(L0 5): mean max cosine of each true feature with the decoder")
def synthetic_topk_auxk(ctx) -> list[Result]:
    res = _synthetic(ctx.full)
    _synthetic_figures(ctx, res)
    return _metric_rows(res["auxk"], ctx.full)


@check(SYN, "topk_no_auxk", "mmcs", threshold=None,
       baselines={"untrained_sae": "the same dictionary at its initialisation (step 0, same seed)"},
       other_metrics={"mmcs_gain_from_auxk": Criterion.finding(">=", 0.05, source="sae.md: Gao et al. 2024, AuxK"),
                      **_SYN_EXTRA},
       description="the same SAE without AuxK (the contrast is part of the result; spec reference 0.82 vs 0.999)")
def synthetic_topk_no_auxk(ctx) -> list[Result]:
    res = _synthetic(ctx.full)
    rows = _metric_rows(res["no_auxk"], ctx.full)
    with_auxk, without = _synthetic_rows(res["auxk"])["mmcs"], rows[0].value
    rows.append(Result(with_auxk - without, metric="mmcs_gain_from_auxk",
                       detail={"with_auxk": with_auxk, "without_auxk": without}))
    return rows


@check(SYN, "topk_untied", "mmcs", threshold=None, full_only=True,
       source="sae.md §1.2 and §2: every library starts tied (W_enc = W_dec^T); the spec states no measured contrast "
              "with an untied start, so this ablation is information (issue 18)",
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
    # MMCS, MCC and the recovered fraction are over the world's ground-truth features
    per_feature = {"mmcs", "mcc", "recovered_fraction"}
    n = entry["world"].features.shape[0]
    untrained = {"untrained_sae": _untrained_mmcs(entry["world"])}
    return [Result(v, metric=None if k == "mmcs" else k, n=n if k in per_feature else None,
                   baselines=untrained if k == "mmcs" else {}, detail=detail) for k, v in scores.items()]


def _untrained_mmcs(world: SyntheticFeatures) -> float:
    """MMCS of the reference dictionary at its initialisation (step 0, same seed): the untrained baseline."""
    _, sae_cfg, cfg = recipes.synthetic_setting(auxk=True)
    return mmcs(world.features, SAE(sae_cfg, seed=cfg.seed).W_dec)


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
    base, n = {"zero_ablation": 0.0}, int(s["n_positions"])
    return [Result(s["ce_loss_recovered"], baselines=base, n=n, detail=detail),
            Result(s["l0"], metric="l0", n=n, detail=detail),
            Result(s["kl_score"], metric="kl_score", n=n, detail=detail),
            Result(s["delta_loss"], metric="delta_loss", n=n, detail=detail),
            Result(s["fvu"], metric="fvu", n=n, detail=detail)]


# TopK keeps at most k latents per token (k = 16 on induction, 32 on grokking: tasks/sae_worlds.py),
# so its L0 cannot exceed 32: information, with the original criterion kept; JumpReLU's L0 is set
# by training and keeps it
_TOPK_L0 = Criterion.info(amended_from=amended(("<=", 32), "a TopK SAE's L0 cannot exceed its k (16 or 32 here) by "
                                               "construction, so the criterion could not fail (issue 18)", ISSUE_18))
_TOY_EXTRA = {"l0": ("<=", 32), "kl_score": None, "delta_loss": None, "fvu": None}


def _register_toy(world: str, arch: str, what: str) -> None:
    extra = {**_TOY_EXTRA, "l0": _TOPK_L0} if arch == "topk" else _TOY_EXTRA

    @check(world, f"sae_{arch}", "ce_loss_recovered", threshold=(">=", 0.90), kind="finding", other_metrics=extra,
           source="sae.md §3 (CE loss recovered, SAELens ce_loss_score): the project's issue sets >= 0.90 at L0 <= 32",
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
    res = he_table(ctx.seed, ctx.full)
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
        rows.append(Result.proportion(r.value, r.kept, baselines=base, detail={
            "layer": 0, "variable": name, "n_pairs": r.n_pairs, "kept": r.kept, "setting": res["setting"],
            "features": t[method].info["features"], "sae": {**HE_SAE, "fvu": res["sae_fvu"], "l0": res["sae_l0"]},
            "neuron_reference": ref, "position_between_neurons_and_das": landing}))
    if landings:
        rows.append(Result(sum(landings) / len(landings), metric="landing_between_neurons_and_das", detail={
            "neuron_reference": ref, "per_variable": dict(zip(t[method].iia, landings)),
            "meaning": "0: at the neurons found the same way, 1: at DAS (mean over variables)"}))
    gaps = contrasts(res["model"], res["test_sets"], t["das"].alignment, t[method].alignment)
    rows += [Result(g.value, metric="das_minus_iia", n=g.n, interval=g.interval, baselines={"das_itself": 0.0},
                    detail={"layer": 0, "variable": name, "das": g.iia_a, method: g.iia_b,
                            "interval": "paired bootstrap over the test pairs", "setting": res["setting"]})
             for name, g in gaps.items()]
    return rows


_HE_BASELINES = {"das": "DAS, 8 dims per variable", "best_neurons": "best neuron set found by the same search",
                 "neurons_masking": "DBM over neurons", "random_subspace": "random 8-d subspace per variable",
                 "das_itself": "das_minus_iia of a method as good as DAS (0 by definition)"}


_HE_EXTRA = {"landing_between_neurons_and_das": None, "das_minus_iia": DAS_ABOVE_SAE_HE}


@check(HE, "sae_search", "iia", threshold=None, baselines=_HE_BASELINES, other_metrics=_HE_EXTRA,
       description="SAE features (TopK, 64 latents, k 4, error term added back) at hidden layer 0, sets found by the "
                   "neuron search, beside DAS and neurons; DAS above them by >= 0.05 (das_minus_iia)")
def he_sae_search(ctx) -> list[Result]:
    _he_figure(ctx, he_table(ctx.seed, ctx.full))
    return _he_rows(ctx, "sae_search")


@check(HE, "sae_dbm", "iia", threshold=None, baselines=_HE_BASELINES, other_metrics=_HE_EXTRA,
       description="SAE features at hidden layer 0, sets found by differentiable binary masking over the latents; "
                   "DAS above them by >= 0.05 (das_minus_iia)")
def he_sae_dbm(ctx) -> list[Result]:
    return _he_rows(ctx, "sae_dbm")


# -- causal scoring on the small price-tagging transformer (--full only) ----------------------
PT = "price_tagging"


def _pt_gap(res: dict[str, Any], method: str, seed: int) -> Result:
    """MIB's average over layers of IIA(Boundless DAS) − IIA(SAE features), paired over the test pairs."""
    model, test = res["model"], res["tests"]["L"]
    per_layer = {layer: (hits(model, test, e["table"]["boundless"].alignment, pt.readout),
                         hits(model, test, e["table"][method].alignment, pt.readout))
                 for layer, e in res["layers"].items()}
    g = paired_contrast(torch.stack([a for a, _ in per_layer.values()]), torch.stack([b for _, b in per_layer.values()]),
                        seed)
    return Result(g.value, metric="das_minus_iia", n=g.n, interval=g.interval, baselines={"das_itself": 0.0}, detail={
        "variable": "L", "position": "?", "found_by": method, "boundless_das": g.iia_a, method: g.iia_b,
        "mean_over": "layers (MIB's average over layers)", "interval": "paired bootstrap over the test pairs",
        "per_layer": {str(layer): float(a.double().mean() - b.double().mean()) for layer, (a, b) in per_layer.items()}})


@check(PT, "sae_features", "iia", threshold=None, full_only=True, other_metrics={"das_minus_iia": DAS_ABOVE_SAE},
       baselines={"boundless_das": "Boundless DAS at the same site", "best_neurons": "best neuron set (same search)",
                  "random_subspace": "random subspace of Boundless DAS's size",
                  "das_itself": "das_minus_iia of a method as good as DAS (0 by definition)"},
       description="L = [Z >= X] at the '?' position after each block: SAE features (TopK, 256 latents, k 8) found "
                   "by the neuron search and by masking, beside Boundless DAS and neurons; Boundless DAS above them "
                   "by >= 0.05 on average over the layers (das_minus_iia; --full only)")
def pt_sae_features(ctx) -> list[Result]:
    res, rows = pt_table(ctx.seed), []
    for layer, entry in res["layers"].items():
        t = entry["table"]
        base = {"boundless_das": t["boundless"].iia["L"].value, "best_neurons": t["neurons"].iia["L"].value,
                "random_subspace": t["random_subspace"].iia["L"].value}
        for method in ("sae_search", "sae_dbm"):
            r = t[method].iia["L"]
            rows.append(Result.proportion(r.value, r.kept, baselines=base, detail={
                "layer": layer, "position": "?", "variable": "L", "found_by": method, "sae_fvu": entry["fvu"],
                "features": t[method].info["features"], "n_pairs": r.n_pairs, "kept": r.kept}))
    return rows + [_pt_gap(res, method, ctx.seed) for method in ("sae_search", "sae_dbm")]
