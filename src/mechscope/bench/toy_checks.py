"""Bench checks of the toy worlds with known mechanisms: superposition (TMS) and grokked
modular addition. Thresholds are the issue's (issue 5) and the spec's (tasks.md), written
here before the checks first ran.

Default runs use the shipped grokking checkpoint (TMS trains in seconds and is always
retrained); ``--full`` retrains the grokking model by its recipe.

Every row carries the untrained baseline: the same measure on the weights its training
started from (same seed). Criteria an untrained model meets were amended (issue 18); each
amendment keeps the original criterion, its reason and its date.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mechscope.bench import Criterion, Result, amended, check
from mechscope.bench import toy_figures as figures
from mechscope.bench.registry import OPS
from mechscope.circuits import fourier
from mechscope.core.checkpoint import load_json
from mechscope.tasks import grokking, grokking_phases, modular, tms

# ------------------------------------------------------------------------------ superposition

DATE = "2026-12-06"
SRC_TMS = "tasks.md (toy models of superposition) + Elhage et al. 2022, arXiv 2209.10652"
TOLERANCE_D = 0.05  # "loose": the authors' own run puts ~26 % of features within 0.005
# Added after the first runs, because the loose criterion above is met by untrained weights
# too (0.48-0.66 over seeds 0-4: at 0.05 the six fractions cover most of [0.33, 1]). At the
# authors' own tolerance the untrained share is 0.04-0.115 (seeds 0-4), the authors' ~0.26;
# registered before the trained value was looked at: >= 0.20.
TIGHT_TOLERANCE_D, TIGHT_SHARE = 0.005, 0.20

# Issue 18: a finding about what training does must fail on the weights training starts
# from. Before these amendments, each registered criterion was scored on the untrained
# weights of seeds 0-999 (tms.initial_model): sparse_represented_features > 2 passed 76 %
# of them, the loose dimensionality share 63 %, sparse D* <= 0.55 23 %, dense represented
# == 2 18.5 %, |dense D* - 1| <= 0.05 7.3 %, the tight share 0.2 %. Rule, written before
# any trained value other than seed 0's was looked at: a criterion that untrained weights
# meet more often than not cannot tell training from chance, and is amended; the others
# stay as the spec registered them, and every row reports the share of initialisations that
# pass its criterion (``untrained_pass_rate``, over 10 000 draws of the initialisation), so a
# weak test is visible as one.
# The represented-feature count is amended to a paired margin: the trained sparsest
# instance represents at least one feature more than its own initialisation did (a count
# moves in whole features, so 1 is the smallest margin; untrained weights score 0 against
# themselves). The measure saturates at n = 5: an initialisation that already has all five
# norms above 0.5 (0.646^5 ~ 10 % of seeds, Xavier normal) cannot gain.
UNTRAINED_DRAWS = 10_000
TMS_CRITERIA = {  # the criteria as first registered; two of them are now info (amended below)
    "dense_dstar_abs_error": ("<=", 0.05), "dense_represented_features": ("==", 2),
    "sparse_represented_features": (">", 2), "sparse_dimensions_per_feature": ("<=", 0.55),
    "feature_dimensionality_near_fractions": (">=", 0.5),
    "feature_dimensionality_near_fractions_tight": (">=", TIGHT_SHARE),
}
# measured after registration, seeds 0-9 (docs/results.md): gains 3, 0, -1, 2, 1, 0, 3, 2, 3, 1
KNOWN_SATURATION = ("the initialisation's count is noise around 3.2 of 5: a seed whose initialisation already has "
                    "all 5 norms above 0.5 (about 10 % of seeds; seeds 1 and 5 of 0-9) cannot gain, and a trained "
                    "sparsest instance may keep 4 of 5 features (seed 2: 4 against an initial 5)")


def _near_share(W: torch.Tensor, tolerance: float) -> torch.Tensor:  # [draws, inst, m, n] -> [draws]
    """Share of the represented features (all instances) whose D_i is near a geometric fraction."""
    flat = W.reshape(-1, *W.shape[2:])  # [draws*inst, m, n]
    keep = (tms.feature_norms(flat) > 0.5).reshape(len(W), -1)  # [draws, inst*n]
    hits = tms.near_fraction(tms.feature_dimensionality(flat), tolerance).reshape(len(W), -1) & keep
    share = hits.sum(-1).double() / keep.sum(-1).clamp_min(1).double()
    return torch.where(keep.any(-1), share, torch.zeros_like(share))


def tms_measure_draws(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """The registered measures of TMS weights ``[draws, inst, m, n]`` (instance 0 dense, the
    last the sparsest), one value per draw."""
    flat = W.reshape(-1, *W.shape[2:])  # [draws*inst, m, n]
    dstar = tms.dimensions_per_feature(flat).reshape(len(W), -1)  # [draws, inst]
    rep = tms.represented_features(flat).reshape(len(W), -1)  # [draws, inst]
    return {"dense_dstar_abs_error": (dstar[:, 0] - 1.0).abs(), "dense_represented_features": rep[:, 0],
            "sparse_represented_features": rep[:, -1], "sparse_dimensions_per_feature": dstar[:, -1],
            "feature_dimensionality_near_fractions": _near_share(W, TOLERANCE_D),
            "feature_dimensionality_near_fractions_tight": _near_share(W, TIGHT_TOLERANCE_D)}


def tms_measures(W: torch.Tensor) -> dict[str, float]:
    """:func:`tms_measure_draws` of one weight tensor ``[inst, m, n]``, as numbers."""
    return {k: v.item() for k, v in tms_measure_draws(W.detach()[None]).items()}


def untrained_pass_rates(cfg: tms.TMSConfig, draws: int = UNTRAINED_DRAWS) -> dict[str, float]:
    """Share of ``draws`` untrained initialisations (fixed generator) that meet each criterion
    of :data:`TMS_CRITERIA` (for an amended row: its original criterion)."""
    W = tms.initial_weight_draws(cfg, draws, torch.Generator().manual_seed(0))
    values = tms_measure_draws(W)
    return {name: float(OPS[op](values[name].double(), value).double().mean())
            for name, (op, value) in TMS_CRITERIA.items()}


@check("tms", "superposition", "dense_dstar_abs_error", threshold=TMS_CRITERIA["dense_dstar_abs_error"],
       kind="finding", source=SRC_TMS,
       other_metrics={
           "dense_represented_features": TMS_CRITERIA["dense_represented_features"],
           "sparse_represented_features": Criterion.info(source=SRC_TMS, amended_from=amended(
               TMS_CRITERIA["sparse_represented_features"], "untrained weights meet it at 76 % of seeds (7 of "
               "seeds 0-9; seed 0 fails, which hid it): the count is shown, the finding is "
               "sparse_represented_gain", DATE)),
           "sparse_represented_gain": Criterion.finding(">=", 1, source=SRC_TMS, after_observation=True,
                                                        known_cause=KNOWN_SATURATION, amended_from=amended(
               None, "new: replaces sparse_represented_features > 2, which untrained weights meet; the trained "
               "sparsest instance must represent at least one feature more than its own initialisation", DATE)),
           "sparse_dimensions_per_feature": TMS_CRITERIA["sparse_dimensions_per_feature"],
           "feature_dimensionality_near_fractions": Criterion.info(source=SRC_TMS, amended_from=amended(
               TMS_CRITERIA["feature_dimensionality_near_fractions"], "untrained weights meet it at 63 % of "
               "seeds (the six fractions +-0.05 cover most of [0.33, 1]); the tight share carries the finding",
               DATE)),
           "feature_dimensionality_near_fractions_tight": TMS_CRITERIA["feature_dimensionality_near_fractions_tight"],
       },
       baselines={"untrained": "the same measure on the initial (untrained) weights of the same seed"},
       description="TMS n=5, m=2, importance 0.9^i, ten sparsity levels trained as one tensor (10k steps): "
                   "dense -> D* = 1 with m features; sparse -> at least one represented feature more than the "
                   "initialisation (the count itself, > m, is shown) and D* <= 0.55; per-feature D_i within "
                   f"{TIGHT_TOLERANCE_D} (the authors' tolerance) of a geometric fraction for at least "
                   f"{TIGHT_SHARE:.0%} of the represented features (within {TOLERANCE_D}: shown). Each row "
                   f"reports the share of {UNTRAINED_DRAWS} untrained initialisations that meet its criterion")
def tms_superposition(ctx) -> list[Result]:
    cfg = tms.intro_config(seed=ctx.seed)
    untrained = tms.initial_model(cfg).W.detach().clone()
    model, hist = tms.train_tms(cfg)
    W, probs = model.W.detach(), cfg.probabilities().tolist()
    dense, sparse = 0, cfg.n_instances - 1  # probabilities fall from 1 to 1/20
    found, base, rates = tms_measures(W), tms_measures(untrained), untrained_pass_rates(cfg)
    detail = {"feature_probability": probs, "dimensions_per_feature": tms.dimensions_per_feature(W).tolist(),
              "represented": tms.represented_features(W).tolist(), "steps": cfg.steps, "seconds": hist["seconds"],
              "steps_per_second": hist["steps_per_second"], "untrained_draws": UNTRAINED_DRAWS}
    with ctx.figure("geometry", caption="TMS n=5, m=2: each feature's direction W_i in the 2-D hidden space, "
                    "from dense (left) to sparse (right); colour = importance") as fig:
        figures.tms_geometry(fig, W, probs, cfg.importance())
    with ctx.figure("norms", caption="‖W_i‖ per feature, coloured by interference Σ_j≠i (Ŵ_i·W_j)²") as fig:
        figures.tms_norm_bars(fig, W, probs, [dense, 3, 6, sparse])
    fractions = list(tms.GEOMETRIC_FRACTIONS)
    extra = {"feature_dimensionality_near_fractions": {"tolerance": TOLERANCE_D, "fractions": fractions},
             "feature_dimensionality_near_fractions_tight": {"tolerance": TIGHT_TOLERANCE_D, "fractions": fractions}}
    rows = [Result(found[name], {"untrained": base[name]},
                   {**detail, **extra.get(name, {}), "untrained_pass_rate": rates[name],
                    "untrained_pass_rate_of": "{} {}".format(*TMS_CRITERIA[name])},
                   metric=None if name == "dense_dstar_abs_error" else name)
            for name in TMS_CRITERIA]
    gain = found["sparse_represented_features"] - base["sparse_represented_features"]
    rows.insert(3, Result(gain, {"untrained": 0}, {**detail, "trained": found["sparse_represented_features"],
                                                   "initial": base["sparse_represented_features"],
                                                   "untrained_pass_rate": 0.0},
                          metric="sparse_represented_gain"))
    return rows


# ------------------------------------------------------------------------------ grokking

P = grokking.GrokkingConfig().p  # the registered run's modulus (113)
CHANCE = math.log(P)  # the loss of a uniform guess over the p residues
SRC_GROK = "tasks.md (modular addition / grokking) + Nanda et al. 2023, arXiv 2301.05217"
# Issue 18: "excluded loss ends above ln p (worse than chance)". An untrained model already
# sits just above ln p (4.761 against 4.727 at step 0 of the shipped history: its small
# random logits add about var/2), so "> ln p" would pass untrained. The margin is 1 nat:
# on the training pairs, with the key frequencies removed, the answer gets on average e
# times less probability than a uniform guess gives it. Written after the final value (6.44)
# was known.
EXCLUDED_MARGIN = 1.0


def _grokking_model(ctx):
    if ctx.full:
        cfg = grokking.GrokkingConfig(seed=ctx.seed)
        model, hist = grokking.train_grokking(cfg, log=ctx.log.info)
        keys = modular.key_frequencies(model)
        return model, modular.progress_over_training(model, hist, keys["agreed"]), "retrained"

    record = load_json(grokking.HISTORY, "grokking training history")
    return grokking.load(), record["progress"], "shipped checkpoint"


def _measures(model, keys: list[int], own: dict[str, Any]) -> dict[str, Any]:
    """Progress measures of one model against ``keys`` (the trained model's key frequencies),
    with the counts the rows report of its own key frequencies ``own``."""
    m = modular.progress_measures(model, keys)
    test = max(m["test_loss"], 1e-30)
    return {"keys": own, "agreeing": len(own["agreed"]), "union": len(own["union"]),
            "agreed_share": len(own["agreed"]) / len(own["union"]) if own["union"] else 0.0,
            "restricted_over_test": m["restricted_loss"] / test if "restricted_loss" in m else 1e9,
            "restricted_acc": m.get("restricted_acc", 0.0), "excluded_loss": m.get("excluded_loss", 0.0), **m}


@check("grokking", "fourier", "test_accuracy", threshold=(">=", 0.999), kind="finding", source=SRC_GROK,
       other_metrics={
           "key_frequencies_agreeing": (">=", 3),
           "key_frequencies_union": Criterion.info(source=SRC_GROK, amended_from=amended(
               ("<=", 7), "untrained weights meet it (6 at seed 0: each view's cut picks a few noise peaks); a small "
               "union says nothing unless the views agree, which key_frequencies_agreed_share tests", DATE)),
           "key_frequencies_agreed_share": Criterion.finding(">=", 3 / 7, source=SRC_GROK, after_observation=True,
                                                             amended_from=amended(
               None, "new: the share of the union all four views agree on; 3/7 is what the registered 3 agreeing "
               "of at most 7 allow, and untrained views agree on none", DATE)),
           "restricted_over_test_loss": Criterion.info(source=SRC_GROK, amended_from=amended(
               ("<=", 2.0), "untrained weights meet it (1.0: restricted and test loss both sit at chance); the "
               "ratio says nothing unless the model beats chance, which restricted_accuracy tests", DATE)),
           "restricted_accuracy": Criterion.finding(">=", 0.999, source=SRC_GROK, after_observation=True,
                                                    amended_from=amended(
               None, "new: the logits kept to the key-frequency cos/sin(w_k(a+b)) components alone answer all p^2 "
               "pairs as well as the model must answer the test pairs (test_accuracy's 0.999)", DATE)),
           "excluded_loss_train": Criterion.finding(">", CHANCE + EXCLUDED_MARGIN, source=SRC_GROK,
                                                    after_observation=True, amended_from=amended(
               (">", 1.0), f"issue 18: the seed says the excluded loss ends worse than chance, ln p = {CHANCE:.3f}; "
               f"an untrained model is at ln p + 0.03, so the margin is {EXCLUDED_MARGIN:g} nat", DATE)),
           "phases_in_order": Criterion.finding(">=", 3, source=SRC_GROK + ", section 5.1 (three phases)",
                                                after_observation=True, amended_from=amended(
               None, "new (issue 18): memorisation, circuit formation and cleanup found in order in the training "
               "history by mechscope.tasks.grokking_phases (rules in its docstring)", DATE)),
       },
       baselines={"untrained": "the same measure on the initial weights of the same seed (for phases_in_order: "
                               "the history of a model that never leaves its initialisation)",
                  "train_loss": "loss on the training pairs", "test_loss": "loss on the held-out pairs"},
       description="the 1-layer transformer of the progress-measures paper (p=113, 30% training pairs, weight decay 1): "
                   "it generalises, its key frequencies agree across W_E, W_U W_out, the neurons and the logits "
                   "(3 or more, at least 3/7 of their union, found from the model), the key frequencies alone "
                   "answer >= 99.9 % of all pairs, the excluded loss ends 1 nat worse than chance (ln p), and "
                   "the training history shows memorisation, circuit formation and cleanup in order")
def grokking_fourier(ctx) -> list[Result]:
    model, series, source = _grokking_model(ctx)
    p = model.cfg.p
    untrained = grokking.initial_model(model.cfg)
    keys = modular.key_frequencies(model)
    m = _measures(model, keys["agreed"], keys)
    u = _measures(untrained, keys["agreed"], modular.key_frequencies(untrained))
    phases = grokking_phases.detect_series(series, p)
    base_phases = grokking_phases.detect_series(grokking_phases.untrained_series(series), p)
    with ctx.figure("progress", caption="Progress measures over training (dashed: end of memorisation, of circuit "
                    "formation, of cleanup, as detected); restricted/excluded loss use the final key "
                    "frequencies") as fig:
        figures.grokking_progress(fig, {**series, "phases": phases["boundaries"]})
    with ctx.figure("embedding_fourier", caption=f"Fourier norms of W_E; key frequencies {keys['agreed']}") as fig:
        figures.fourier_norms(fig, fourier.fourier_norms(model.embed.weight[:p], p), "W_E in the Fourier basis")
    losses = {"train_loss": m["train_loss"], "test_loss": m["test_loss"]}
    base = lambda name: {"untrained": u[name], **losses}  # noqa: E731
    detail = {"model": source, "p": p, "key_frequencies": keys, "untrained_key_frequencies": u["keys"],
              **{k: v for k, v in m.items() if k != "keys"}}
    n_test = len(grokking.split(model.cfg)[1])
    return [Result.proportion(m["test_acc"], n_test, baselines=base("test_acc"), detail={**detail, "n_test": n_test}),
            Result(m["agreeing"], base("agreeing"), detail, metric="key_frequencies_agreeing"),
            Result(m["union"], base("union"), detail, metric="key_frequencies_union"),
            Result(m["agreed_share"], base("agreed_share"), detail, metric="key_frequencies_agreed_share"),
            Result(m["restricted_over_test"], base("restricted_over_test"), detail, metric="restricted_over_test_loss"),
            Result.proportion(m["restricted_acc"], p * p, baselines=base("restricted_acc"), detail=detail,
                              metric="restricted_accuracy"),
            Result(m["excluded_loss"], base("excluded_loss"), {**detail, "chance": CHANCE}, metric="excluded_loss_train"),
            Result(phases["found"], {"untrained": base_phases["found"]},
                   {"model": source, "p": p, "history": source if ctx.full else "shipped training history",
                    "boundaries": phases["boundaries"], "phases": phases["phases"], "why_not": phases["why"],
                    "rules": "mechscope.tasks.grokking_phases", "untrained_why_not": base_phases["why"]},
                   metric="phases_in_order")]
