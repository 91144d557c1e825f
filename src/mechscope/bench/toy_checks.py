"""Bench checks of the toy worlds with known mechanisms, and of the circuit tools that
must rediscover them: superposition, induction heads, grokked modular addition, and a
hand-set circuit. Thresholds are the issue's (issue 5) and the spec's (tasks.md),
written here before the checks first ran.

Default runs use the shipped checkpoints (TMS trains in seconds and is always
retrained); ``--full`` retrains the induction and grokking models by their recipes.

How our induction models compare with the spec's measured ones (they learn more; the
1-layer control attends by relative position) is measured in ``docs/results.md``.

Why the 1-layer row cannot pass for a trained control: guessing evenly among the tokens
P - 1 positions back, for the training periods P (the row's ``position_only`` baseline),
can be computed from positions alone by one attention layer, so a control that has
converged is at or below that guess; the threshold sits where the control stands before
it has learnt the positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mechscope.bench import Result, check
from mechscope.bench import toy_figures as figures
from mechscope.circuits import fourier
from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import auc
from mechscope.circuits.heads import attention_patterns, head_ablation_sweep, head_scores
from mechscope.circuits.patching import Cell, patch_cells, path_patch
from mechscope.core import aliases
from mechscope.core.checkpoint import load_json
from mechscope.core.intervene import Mean
from mechscope.core.run import cache, run
from mechscope.core.structure import structure
from mechscope.tasks import grokking, induction, modular, tms
from mechscope.zoo.transformer import Transformer

# ------------------------------------------------------------------------------ superposition

TOLERANCE_D = 0.05  # "loose": the authors' own run puts ~26 % of features within 0.005
# Added after the first runs, because the loose criterion above is met by untrained weights
# too (0.48-0.66 over seeds 0-4: at 0.05 the six fractions cover most of [0.33, 1]). At the
# authors' own tolerance the untrained share is 0.04-0.115 (seeds 0-4), the authors' ~0.26;
# registered before the trained value was looked at: >= 0.20.
TIGHT_TOLERANCE_D, TIGHT_SHARE = 0.005, 0.20


@check("tms", "superposition", "dense_dstar_abs_error", threshold=("<=", 0.05),
       other_metrics={"dense_represented_features": ("==", 2), "sparse_represented_features": (">", 2),
                      "sparse_dimensions_per_feature": ("<=", 0.55),
                      "feature_dimensionality_near_fractions": (">=", 0.5),
                      "feature_dimensionality_near_fractions_tight": (">=", TIGHT_SHARE)},
       baselines={"untrained": "the same measure on the initial (untrained) weights"},
       description="TMS n=5, m=2, importance 0.9^i, ten sparsity levels trained as one tensor (10k steps): "
                   "dense -> D* = 1 with m features; sparse -> > m features and D* <= 0.55; per-feature D_i "
                   f"within {TOLERANCE_D} of a geometric fraction for at least half the represented features, and "
                   f"within {TIGHT_TOLERANCE_D} (the authors' tolerance) for at least {TIGHT_SHARE:.0%} of them "
                   "(untrained weights meet the loose criterion but not the tight one)")
def tms_superposition(ctx) -> list[Result]:
    cfg = tms.intro_config(seed=ctx.seed)
    untrained = tms.TMS(cfg).W.detach().clone()
    model, hist = tms.train_tms(cfg)
    W, probs = model.W.detach(), cfg.probabilities().tolist()
    dense, sparse = 0, cfg.n_instances - 1  # probabilities fall from 1 to 1/20
    dstar, rep = tms.dimensions_per_feature(W), tms.represented_features(W)

    def near_share(w: torch.Tensor, tolerance: float = TOLERANCE_D) -> float:
        keep = tms.feature_norms(w) > 0.5
        hits = tms.near_fraction(tms.feature_dimensionality(w), tolerance)[keep]
        return float(hits.double().mean()) if hits.numel() else 0.0

    base_d, base_rep = tms.dimensions_per_feature(untrained), tms.represented_features(untrained)
    detail = {"feature_probability": probs, "dimensions_per_feature": dstar.tolist(), "represented": rep.tolist(),
              "steps": cfg.steps, "seconds": hist["seconds"], "steps_per_second": hist["steps_per_second"]}
    with ctx.figure("geometry", caption="TMS n=5, m=2: each feature's direction W_i in the 2-D hidden space, "
                    "from dense (left) to sparse (right); colour = importance") as fig:
        figures.tms_geometry(fig, W, probs, cfg.importance())
    with ctx.figure("norms", caption="‖W_i‖ per feature, coloured by interference Σ_j≠i (Ŵ_i·W_j)²") as fig:
        figures.tms_norm_bars(fig, W, probs, [dense, 3, 6, sparse])
    return [
        Result(abs(float(dstar[dense]) - 1.0), {"untrained": abs(float(base_d[dense]) - 1.0)}, detail),
        Result(int(rep[dense]), {"untrained": int(base_rep[dense])}, detail, metric="dense_represented_features"),
        Result(int(rep[sparse]), {"untrained": int(base_rep[sparse])}, detail, metric="sparse_represented_features"),
        Result(float(dstar[sparse]), {"untrained": float(base_d[sparse])}, detail, metric="sparse_dimensions_per_feature"),
        Result(near_share(W), {"untrained": near_share(untrained)}, {**detail, "tolerance": TOLERANCE_D,
               "fractions": list(tms.GEOMETRIC_FRACTIONS)}, metric="feature_dimensionality_near_fractions"),
        Result(near_share(W, TIGHT_TOLERANCE_D), {"untrained": near_share(untrained, TIGHT_TOLERANCE_D)},
               {**detail, "tolerance": TIGHT_TOLERANCE_D, "fractions": list(tms.GEOMETRIC_FRACTIONS)},
               metric="feature_dimensionality_near_fractions_tight"),
    ]


# ------------------------------------------------------------------------------ induction


_RETRAINED: dict[tuple[int, int], tuple[Any, Any, str]] = {}  # (n_layers, seed): one retraining per --full run


def _induction_models(ctx) -> dict[int, tuple[Any, Any, str]]:
    out = {}
    for n in (2, 1):
        if ctx.full:
            if (n, ctx.seed) not in _RETRAINED:
                cfg = induction.InductionConfig(n_layers=n, seed=ctx.seed)
                model, _ = induction.train_induction(cfg, log=ctx.log.info)
                _RETRAINED[(n, ctx.seed)] = (model, cfg, "retrained")
            out[n] = _RETRAINED[(n, ctx.seed)]
        else:
            model, cfg = induction.load(n_layers=n)
            out[n] = (model, cfg, "shipped checkpoint")
    return out


@check("induction", "training", "repeated_half_loss_2l", threshold=("<", 0.5),
       other_metrics={"repeated_half_loss_1l": (">", 3.0)},
       baselines={"first_half": "loss on the first (unpredictable) copy", "uniform": "ln V",
                  "position_only": "an even guess over the tokens P positions back for every training period P "
                                   "(what one layer can do from position alone; a converged control does at "
                                   "least as well)"},
       description="attention-only transformers on BOS r r (period drawn per sequence in training, fixed "
                   "repeats in evaluation): the 2-layer model predicts the repeat, the 1-layer control cannot")
def induction_losses(ctx) -> list[Result]:
    rows = []
    for n, (model, cfg, source) in _induction_models(ctx).items():
        ev = induction.evaluate(model, cfg)
        guess = induction.position_only_loss(induction.eval_batch(cfg), cfg.half_len)
        rows.append(Result(ev["repeated_half_loss"], {"first_half": ev["first_half_loss"], "uniform": math.log(cfg.vocab),
                                                      "position_only": guess},
                           {"model": source, "n_layers": n, "half_len": cfg.half_len, "loss_on": "tokens r_1..r_{L-1} of the second copy"},
                           metric=f"repeated_half_loss_{n}l"))
    return rows


@check("induction", "head_scores", "best_layer1_induction_stripe", threshold=(">", 0.5),
       other_metrics={"best_layer0_previous_token": None, "one_layer_best_induction_stripe": None},
       baselines={"untrained": "the same score on a randomly initialised model of the same shape"},
       description="induction score = stripe score (mean attention from the repeat's queries to the token after "
                   "the previous occurrence), not the saturating 'mul' score; also previous-token and duplicate-token")
def induction_head_scores(ctx) -> list[Result]:
    models = _induction_models(ctx)
    model, cfg, source = models[2]
    tokens = induction.eval_batch(cfg)
    scores = head_scores(model, tokens, cfg.half_len, cfg.n_layers)
    torch.manual_seed(ctx.seed)
    untrained = head_scores(Transformer(cfg.model_config()).eval(), tokens, cfg.half_len, cfg.n_layers)
    one, one_cfg, _ = models[1]
    one_scores = head_scores(one, tokens, one_cfg.half_len, 1)
    ind_head = int(scores["induction_stripe"][1].argmax())
    prev_head = int(scores["previous_token"][0].argmax())
    pats = attention_patterns(model, tokens[:1], cfg.n_layers)[:, 0]  # [layers, heads, q, k]
    with ctx.figure("patterns", caption=f"Attention on one BOS r r sequence: layer-0 head {prev_head} "
                    f"(previous token) and layer-1 head {ind_head} (induction stripe)") as fig:
        figures.attention_heads(fig, torch.stack([pats[0, prev_head], pats[1, ind_head]]),
                                [f"L0H{prev_head} previous-token", f"L1H{ind_head} induction"])
    with ctx.figure("scores", caption="Head scores of the 2-layer model (layers x heads)") as fig:
        figures.head_score_maps(fig, scores)
    detail = {"model": source, "scores": {k: v.tolist() for k, v in scores.items()}, "induction_score": "stripe"}
    return [
        Result(float(scores["induction_stripe"][1].max()), {"untrained": float(untrained["induction_stripe"][1].max())},
               {**detail, "head": [1, ind_head]}),
        Result(float(scores["previous_token"][0].max()), {"untrained": float(untrained["previous_token"][0].max())},
               {**detail, "head": [0, prev_head]}, metric="best_layer0_previous_token"),
        Result(float(one_scores["induction_stripe"][0].max()), {}, {"model": "1-layer control"},
               metric="one_layer_best_induction_stripe"),
    ]


@check("induction", "head_ablation", "ablated_repeated_half_loss", threshold=(">=", 0.75 * math.log(64)),
       other_metrics={"all_induction_heads_ablated_loss": None},
       baselines={"unablated": "repeated-half loss of the intact model", "uniform": "ln V"},
       description="mean-ablate the best layer-1 induction head (by stripe score): the repeated-half loss should "
                   "return near ln V (criterion: >= 0.75 ln V); zero ablation and ablating every induction head "
                   "(stripe > 0.5) together are reported beside it")
def induction_ablation(ctx) -> list[Result]:
    model, cfg, source = _induction_models(ctx)[2]
    tokens = induction.eval_batch(cfg)
    scores = head_scores(model, tokens, cfg.half_len, cfg.n_layers)
    stripe = scores["induction_stripe"][1]
    best = int(stripe.argmax())

    def metric(logits):
        return induction.repeated_half_loss(logits, tokens, cfg.half_len)

    sweeps = {kind: head_ablation_sweep(model, tokens, metric, kind, metric_name="repeated_half_loss")
              for kind in ("mean", "zero")}
    heads = [h for h in range(cfg.n_heads) if stripe[h] > 0.5]
    site = aliases.head_out(model, 1, 0).replace(heads=heads or [best], name=None)
    with torch.no_grad():
        view = cache(model, tokens, [site])[site]
        out, _ = run(model, tokens, {site: Mean(view.mean(0))})
    all_loss = float(metric(out))
    detail = {"model": source, "head": [1, best], "ablation": "mean (over the evaluation batch, per position)",
              "zero_ablation_loss": float(sweeps["zero"].values[1, best]),
              "sweeps": {k: v.to_dict() for k, v in sweeps.items()}}
    base = {"unablated": sweeps["mean"].baseline, "uniform": math.log(cfg.vocab)}
    return [Result(float(sweeps["mean"].values[1, best]), base, detail),
            Result(all_loss, base, {"model": source, "heads": [[1, h] for h in heads], "ablation": "mean"},
                   metric="all_induction_heads_ablated_loss")]


def _induction_patching_inputs(model, cfg):
    gen = torch.Generator().manual_seed(7)
    clean = induction.repeated_tokens(128, cfg.half_len, cfg.vocab, generator=gen)
    corrupt = induction.corrupt_first_copy(clean, cfg.half_len, cfg.vocab, gen)

    def metric(logits):
        return induction.induction_metric(logits, clean, cfg.half_len)
    return clean, corrupt, metric


def _head_cells(model) -> list[Cell]:
    s = structure(model)
    return [Cell(aliases.head_out(s, layer, h).replace(name=None), None, f"L{layer}H{h}")
            for layer in range(s.n_layers) for h in range(s.n_heads)]


def _identified(effects: torch.Tensor, scores: dict, cfg) -> tuple[float, dict]:
    """Share of {top layer-0 head = best previous-token head, top layer-1 head is an induction head}."""
    eff = effects.abs().view(cfg.n_layers, cfg.n_heads)
    top0, top1 = int(eff[0].argmax()), int(eff[1].argmax())
    prev = int(scores["previous_token"][0].argmax())
    ok = [top0 == prev, bool(scores["induction_stripe"][1][top1] > 0.5)]
    return sum(ok) / 2, {"top_layer0": top0, "best_previous_token": prev, "top_layer1": top1,
                         "top_layer1_stripe": float(scores["induction_stripe"][1][top1]), "effects": eff.tolist()}


def _register_identification(method: str, tool: Any) -> None:
    """One check per tool: does ``tool`` (activation or attribution patching) single out the path?"""
    @check("induction", method, "prev_to_induction_identified", threshold=("==", 1.0),
           description=f"{method.replace('_', ' ')} of every head (noising: corrupt first copy patched into the "
                       "clean run; metric: logit difference on the repeat): the top layer-0 head is the best "
                       "previous-token head and the top layer-1 head an induction head (stripe > 0.5)")
    def identification(ctx) -> Result:
        model, cfg, source = _induction_models(ctx)[2]
        clean, corrupt, metric = _induction_patching_inputs(model, cfg)
        res = tool(model, clean, corrupt, _head_cells(model), metric, direction="noise")
        scores = head_scores(model, induction.eval_batch(cfg), cfg.half_len, cfg.n_layers)
        value, detail = _identified(res.effects, scores, cfg)
        return Result(value, {}, {"model": source, "ablation": res.ablation, **detail})


_register_identification("activation_patching", patch_cells)
_register_identification("attribution_patching", attribution_patching)


@check("induction", "path_patching", "top_edge_is_prev_to_induction_k", threshold=("==", 1.0),
       description="path patching of every (layer-0 head -> layer-1 head's q, k or v input) edge: the edge with the "
                   "largest effect runs from the best previous-token head into the K input of an induction head")
def induction_path(ctx) -> Result:
    model, cfg, source = _induction_models(ctx)[2]
    clean, corrupt, metric = _induction_patching_inputs(model, cfg)
    edges = _edge_effects(model, clean, corrupt, metric)
    (sender, receiver, part), best = max(edges.items(), key=lambda kv: abs(kv[1]))
    scores = head_scores(model, induction.eval_batch(cfg), cfg.half_len, cfg.n_layers)
    prev = int(scores["previous_token"][0].argmax())
    ok = sender == prev and part == "k" and bool(scores["induction_stripe"][1][receiver] > 0.5)
    return Result(float(ok), {}, {"model": source, "top_edge": [f"L0H{sender}", f"L1H{receiver}.{part}"],
                                  "effect": best, "best_previous_token": prev, "ablation": "path patch corrupt->clean (noising)",
                                  "edges": {f"L0H{s}->L1H{r}.{p}": v for (s, r, p), v in edges.items()}})


def _edge_effects(model, clean, corrupt, metric) -> dict[tuple[int, int, str], float]:
    """Noising effect of every path from a layer-0 head into a layer-1 head's q, k or v."""
    n_heads = structure(model).n_heads
    out = {}
    for s in range(n_heads):
        for r in range(n_heads):
            for part in ("q", "k", "v"):
                receiver = aliases.head_in(model, 1, r, part)
                score = path_patch(model, clean, corrupt, aliases.head_out(model, 0, s), receiver, metric, "noise")
                out[(s, r, part)] = 1.0 - score  # noising effect
    return out


# ------------------------------------------------------------------------------ hand-set circuit


@check("hand_set_circuit", "circuit_ranking", "head_auc_activation_patching", threshold=("==", 1.0),
       other_metrics={"head_auc_attribution_patching": ("==", 1.0), "edge_auc_path_patching": ("==", 1.0)},
       baselines={"attention_scores": "AUC of ranking heads by previous-token + induction pattern scores"},
       description="a 2-layer transformer whose induction circuit is set by hand, with decoy heads that share the "
                   "circuit's attention patterns but write nowhere that matters: patching, attribution and path "
                   "patching must rank the circuit's heads / edge above every other (AUC 1.0)")
def hand_set_circuit(ctx) -> list[Result]:
    model, truth = induction.hand_set_model()
    V, L = model.cfg.vocab, (model.cfg.n_ctx - 1) // 2
    gen = torch.Generator().manual_seed(ctx.seed)
    clean = induction.repeated_tokens(64, L, V, generator=gen)
    corrupt = induction.corrupt_first_copy(clean, L, V, gen)

    def metric(logits):
        return induction.induction_metric(logits, clean, L)

    cells = _head_cells(model)
    labels = torch.tensor([(layer, h) in truth["heads"] for layer in range(2) for h in range(4)])
    act = patch_cells(model, clean, corrupt, cells, metric, direction="noise")
    attr = attribution_patching(model, clean, corrupt, cells, metric, direction="noise")
    edges = _edge_effects(model, clean, corrupt, metric)
    edge_labels = torch.tensor([(s, r, p) == (0, 0, "k") for (s, r, p) in edges])
    pats = head_scores(model, clean, L, 2)
    pattern_rank = (pats["previous_token"] + pats["induction_stripe"]).flatten()
    with ctx.figure("effects", caption="Hand-set circuit: effect of each head (noising); * = circuit member") as fig:
        figures.effect_bars(fig, [c.label for c in cells], {"activation patching": act.effects.abs(),
                            "attribution patching": attr.effects.abs()}, [f"L{a}H{b}" for a, b in truth["heads"]])
    base = {"attention_scores": auc(pattern_rank, labels)}
    detail = {"truth": truth, "ablation": act.ablation, "effects": act.effects.tolist()}
    return [Result(auc(act.effects.abs(), labels), base, detail),
            Result(auc(attr.effects.abs(), labels), base, {**detail, "ablation": attr.ablation, "effects": attr.effects.tolist()},
                   metric="head_auc_attribution_patching"),
            Result(auc(torch.tensor([abs(v) for v in edges.values()]), edge_labels), {}, {"n_edges": len(edges),
                   "ablation": "path patch corrupt->clean (noising)"}, metric="edge_auc_path_patching")]


# ------------------------------------------------------------------------------ grokking


def _grokking_model(ctx):
    if ctx.full:
        cfg = grokking.GrokkingConfig(seed=ctx.seed)
        model, hist = grokking.train_grokking(cfg, log=ctx.log.info)
        keys = modular.key_frequencies(model)
        return model, modular.progress_over_training(model, hist, keys["agreed"]), "retrained"

    record = load_json(grokking.HISTORY, "grokking training history")
    return grokking.load(), record["progress"], "shipped checkpoint"


@check("grokking", "fourier", "test_accuracy", threshold=(">=", 0.999),
       other_metrics={"key_frequencies_agreeing": (">=", 3), "key_frequencies_union": ("<=", 7),
                      "restricted_over_test_loss": ("<=", 2.0), "excluded_loss_train": (">", 1.0)},
       baselines={"train_loss": "loss on the training pairs", "test_loss": "loss on the held-out pairs"},
       description="the 1-layer transformer of the progress-measures paper (p=113, 30% training pairs, weight decay 1): "
                   "it generalises, its key frequencies agree across W_E, W_U W_out, the neurons and the logits "
                   "(3 to 7 of them, found from the model), restricted loss <= 2x test loss, excluded loss > 1")
def grokking_fourier(ctx) -> list[Result]:
    model, series, source = _grokking_model(ctx)
    keys = modular.key_frequencies(model)
    m = modular.progress_measures(model, keys["agreed"])
    p = model.cfg.p
    with ctx.figure("progress", caption="Progress measures over training (dashed: end of memorisation, of circuit "
                    "formation, of cleanup); restricted/excluded loss use the final key frequencies") as fig:
        figures.grokking_progress(fig, series)
    with ctx.figure("embedding_fourier", caption=f"Fourier norms of W_E; key frequencies {keys['agreed']}") as fig:
        figures.fourier_norms(fig, fourier.fourier_norms(model.embed.weight[:p], p), "W_E in the Fourier basis")
    base = {"train_loss": m["train_loss"], "test_loss": m["test_loss"]}
    detail = {"model": source, "p": p, "key_frequencies": keys, **m}
    restricted = m.get("restricted_loss", math.inf)
    return [Result(m["test_acc"], base, detail),
            Result(len(keys["agreed"]), {}, detail, metric="key_frequencies_agreeing"),
            Result(len(keys["union"]), {}, detail, metric="key_frequencies_union"),
            Result(restricted / max(m["test_loss"], 1e-30) if math.isfinite(restricted) else 1e9, base, detail,
                   metric="restricted_over_test_loss"),
            Result(m.get("excluded_loss", 0.0), base, detail, metric="excluded_loss_train")]
