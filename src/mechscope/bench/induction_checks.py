"""Bench checks of induction heads in the trained 2-layer and 1-layer transformers, and of
the circuit tools that must rediscover them (head scores, head ablation, activation,
attribution and path patching), plus a hand-set induction circuit with decoy heads.

Default runs use the shipped checkpoints; ``--full`` retrains both models by their recipes.
How our induction models compare with the spec's measured ones (they learn more; the
1-layer control attends by relative position) is measured in ``docs/results.md``.

Amendments of 2026-12-06 (issue 18), each written down before the amended row ran:

- *1-layer control.* "loss > 3" tested the wrong thing: a position-only guess scores about
  2.3 nats. The control is now held to the Bayes-optimal position-only mixture
  (:mod:`mechscope.tasks.induction_bound`) on the same evaluation batch: its loss is not
  below that bound by more than 0.1 nat (finite-sample slack), and the 2-layer model's is
  below it by at least 1.5 nats.
- *Head ablation.* All four layer-1 heads are induction heads, so ablating one shows
  redundancy. Ablating every head with stripe > 0.5 must raise the repeated-half loss to
  >= 0.75 ln V, and ablating as many random heads whose stripe and previous-token scores are
  both < 0.1 (5 draws) must raise it by less than half as much; with too few such heads the
  control is not available and its row is info.
- *Patching identifies the circuit.* "The top layer-1 head is an induction head" cannot
  fail when every layer-1 head is one. Pre-registered instead: circuit heads are those
  with induction stripe > 0.5 or previous-token score > 0.5 (attention only, the 0.5 of the
  stripe finding); the tool's |effect| must rank them above the other heads with AUC >= 0.9
  (nine in ten (member, non-member) pairs in order), and that AUC must be one a uniformly
  random ranking reaches with probability < 0.05 (exact: :func:`~mechscope.core.stats.auc_permutation_p`), so a
  ranking cannot pass on a split with too few non-members to tell it from chance. Path
  patching: the circuit edges are previous-token head -> K input of an induction head,
  same two criteria over every (layer-0 head, layer-1 head, q/k/v) edge.

Losses and stripes carry n (sequences of the evaluation batch) and a 95 % percentile
bootstrap interval over those sequences.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from mechscope.bench import Criterion, Result, amended, check
from mechscope.bench import toy_figures as figures
from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import auc
from mechscope.circuits.heads import (
    attention_patterns,
    head_ablation_sweep,
    head_scores,
    induction_score,
    previous_token_score,
)
from mechscope.circuits.patching import Cell, patch_cells, path_patch
from mechscope.core import aliases
from mechscope.core.intervene import Mean
from mechscope.core.run import cache, run
from mechscope.core.stats import auc_permutation_p, auc_random_quantile, bootstrap_interval
from mechscope.core.structure import structure
from mechscope.tasks import induction
from mechscope.tasks.induction_bound import mixture_losses, optimal_positional_mixture
from mechscope.zoo.transformer import Transformer

AMENDED = "2026-12-06"
SPEC = "shared/specs/tasks.md (induction heads; Elhage et al. 2021, Olsson et al. 2022)"
ISSUE = "issue 18 (amendment of the spec's check)"

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


def _untrained(cfg, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg.model_config()).eval()


def _losses(model, tokens, cfg) -> torch.Tensor:  # [batch]
    with torch.no_grad():
        return induction.repeated_half_losses(model(tokens), tokens, cfg.half_len).double()


@lru_cache(maxsize=4)
def _bound(half_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Position-only bound on the evaluation batch per sequence ``[batch]`` and per query
    ``[L - 1]`` (pure, so cached per run)."""
    tokens = induction.eval_batch(induction.InductionConfig(half_len=half_len, vocab=vocab))
    mix = optimal_positional_mixture(half_len, vocab)
    losses = mixture_losses(mix, tokens)  # [batch, L - 1]
    return losses.mean(1), losses.mean(0), {"certificate": mix.gap, "dropped_collision_mass": mix.dropped_mass,
                                            "training_loss_per_query": (-mix.objective).tolist()}


def _plot_per_query(ctx, per_query: dict[str, torch.Tensor], half_len: int) -> None:
    """Repeated-half loss per query position: the models against the position-only bound."""
    with ctx.figure("loss_per_position", caption="Loss on each token of the repeat (evaluation batch) against "
                    "the Bayes-optimal position-only mixture: the 1-layer control stays near or above it on average "
                    "(one position can dip below, as the bound is optimal for the training periods, not for the "
                    "evaluation's P = L), the 2-layer model is far below") as fig:
        ax = fig.add_subplot()
        for name, values in per_query.items():
            ax.plot(range(half_len + 2, 2 * half_len + 1), values.tolist(), marker=".", label=name)
        ax.set_xlabel("index of the predicted token")
        ax.set_ylabel("loss (nats)")
        ax.legend()



_BOUND_WHY = ("the data's period P ~ U[L/2, L] lets a position-only guess score ~2.3 nats, so 'loss > 3' tested "
              "the wrong thing; held instead to the Bayes-optimal position-only mixture under the training prior")


@check("induction", "training", "repeated_half_loss_2l", threshold=("<", 0.5), kind="finding", source=SPEC,
       other_metrics={
           "repeated_half_loss_1l": Criterion.info(amended_from=amended((">", 3.0), "criterion moved to "
                                                   "loss_1l_minus_positional_bound: " + _BOUND_WHY, AMENDED)),
           "loss_1l_minus_positional_bound": Criterion.finding(
               ">=", -0.1, source=ISSUE + ": one attention layer cannot beat the best position-only mixture "
               "(0.1 nat of finite-sample slack)", after_observation=True,
               amended_from=amended((">", 3.0), "replaces repeated_half_loss_1l > 3: " + _BOUND_WHY, AMENDED),
               known_cause="where not reproduced: a trained layer sums logits, not probabilities (a wider class "
                           "than the bound's mixtures), and the bound is optimal for the training periods, not for "
                           "the evaluation's P = L (tasks/induction_bound.py)"),
           "positional_bound_minus_loss_2l": Criterion.finding(
               ">=", 1.5, source=ISSUE + ": two layers do induction, far below the position-only bound",
               after_observation=True, amended_from=amended(None, "new with the 1-layer amendment: the 2-layer "
                                                            "model against the same bound", AMENDED)),
           "positional_bound": None},
       baselines={"first_half": "loss on the first (unpredictable) copy", "uniform": "ln V",
                  "untrained": "the same metric for a randomly initialised model of the same shape",
                  "position_only": "an even guess over the tokens P positions back for every training period P",
                  "positional_bound": "the Bayes-optimal position-only mixture (tasks/induction_bound.py)",
                  "two_layer": "loss_1l_minus_positional_bound of the 2-layer model (which does induction)"},
       description="attention-only transformers on BOS r r (period drawn per sequence in training, fixed "
                   "repeats in evaluation): the 2-layer model predicts the repeat, the 1-layer control does no "
                   "better than the best position-only predictor; losses over the evaluation sequences")
def induction_losses(ctx) -> list[Result]:
    models = _induction_models(ctx)
    cfg = models[2][1]
    tokens = induction.eval_batch(cfg)
    bound, bound_per_query, bound_detail = _bound(cfg.half_len, cfg.vocab)
    guess = induction.position_only_loss(tokens, cfg.half_len)
    loss, untrained, per_query, rows = {}, {}, {"position-only bound": bound_per_query}, []
    for n, (model, mcfg, source) in models.items():
        with torch.no_grad():
            logits = model(tokens)
        loss[n] = induction.repeated_half_losses(logits, tokens, mcfg.half_len).double()
        untrained[n] = _losses(_untrained(mcfg, ctx.seed), tokens, mcfg)
        first = float(induction.first_half_loss(logits, tokens, mcfg.half_len))
        per_query[f"{n}-layer model"] = induction.token_losses(logits, tokens)[:, mcfg.half_len + 1:].mean(0)
        base = {"first_half": first, "uniform": math.log(mcfg.vocab), "position_only": guess,
                "positional_bound": float(bound.mean()), "untrained": float(untrained[n].mean())}
        rows.append(Result.mean(loss[n], ctx.seed, baselines=base, metric=f"repeated_half_loss_{n}l",
                              detail={"model": source, "n_layers": n, "half_len": mcfg.half_len,
                                      "loss_on": "tokens r_1..r_{L-1} of the second copy",
                                      "interval": "bootstrap over the evaluation sequences"}))
    paired = {"interval": "paired bootstrap over the evaluation sequences", "bound": bound_detail}
    rows += [
        Result.mean(loss[1] - bound, ctx.seed, metric="loss_1l_minus_positional_bound", detail={**paired, "model": models[1][2]},
                  baselines={"two_layer": float((loss[2] - bound).mean()),
                             "untrained": float((untrained[1] - bound).mean())}),
        Result.mean(bound - loss[2], ctx.seed, metric="positional_bound_minus_loss_2l", detail={**paired, "model": models[2][2]},
                  baselines={"untrained": float((bound - untrained[2]).mean())}),
        Result.mean(bound, ctx.seed, metric="positional_bound", baselines={"position_only": guess},
                  detail={"what": "repeated-half loss of the Bayes-optimal position-only mixture on the evaluation "
                                  "batch", **bound_detail}),
    ]
    _plot_per_query(ctx, per_query, cfg.half_len)
    return rows


def _per_sequence_scores(model, tokens, cfg, n_layers: int) -> dict[str, torch.Tensor]:  # [layers, batch, heads]
    """Stripe and previous-token scores of every head on each sequence (the batch axis moved
    in front of the scores' mean over the batch)."""
    pats = attention_patterns(model, tokens, n_layers).unsqueeze(2)  # [layers, batch, 1, heads, q, k]
    return {"induction_stripe": induction_score(pats, cfg.half_len).double(),
            "previous_token": previous_token_score(pats).double()}


@check("induction", "head_scores", "best_layer1_induction_stripe", threshold=(">", 0.5), kind="finding", source=SPEC,
       other_metrics={"best_layer0_previous_token": None, "one_layer_best_induction_stripe": None},
       baselines={"untrained": "the same score on a randomly initialised model of the same shape"},
       description="induction score = stripe score (mean attention from the repeat's queries to the token after "
                   "the previous occurrence), not the saturating 'mul' score; also previous-token and duplicate-token; "
                   "intervals: bootstrap over the evaluation sequences")
def induction_head_scores(ctx) -> list[Result]:
    models = _induction_models(ctx)
    model, cfg, source = models[2]
    tokens = induction.eval_batch(cfg)
    scores = head_scores(model, tokens, cfg.half_len, cfg.n_layers)
    untrained = head_scores(_untrained(cfg, ctx.seed), tokens, cfg.half_len, cfg.n_layers)
    one, one_cfg, _ = models[1]
    one_scores = head_scores(one, tokens, one_cfg.half_len, 1)
    ind_head = int(scores["induction_stripe"][1].argmax())
    prev_head = int(scores["previous_token"][0].argmax())
    one_head = int(one_scores["induction_stripe"][0].argmax())
    per_seq = _per_sequence_scores(model, tokens, cfg, cfg.n_layers)
    one_stripes = _per_sequence_scores(one, tokens, one_cfg, 1)["induction_stripe"][0, :, one_head]
    pats = attention_patterns(model, tokens[:1], cfg.n_layers)[:, 0]  # [layers, heads, q, k]
    with ctx.figure("patterns", caption=f"Attention on one BOS r r sequence: layer-0 head {prev_head} "
                    f"(previous token) and layer-1 head {ind_head} (induction stripe)") as fig:
        figures.attention_heads(fig, torch.stack([pats[0, prev_head], pats[1, ind_head]]),
                                [f"L0H{prev_head} previous-token", f"L1H{ind_head} induction"])
    with ctx.figure("scores", caption="Head scores of the 2-layer model (layers x heads)") as fig:
        figures.head_score_maps(fig, scores)
    detail = {"model": source, "scores": {k: v.tolist() for k, v in scores.items()}, "induction_score": "stripe",
              "interval": "bootstrap over the evaluation sequences (head chosen on the whole batch)"}
    return [
        Result.mean(per_seq["induction_stripe"][1, :, ind_head], ctx.seed, detail={**detail, "head": [1, ind_head]},
                  baselines={"untrained": float(untrained["induction_stripe"][1].max())}),
        Result.mean(per_seq["previous_token"][0, :, prev_head], ctx.seed, detail={**detail, "head": [0, prev_head]},
                  baselines={"untrained": float(untrained["previous_token"][0].max())}, metric="best_layer0_previous_token"),
        Result.mean(one_stripes, ctx.seed, detail={"model": "1-layer control", "head": [0, one_head]},
                  metric="one_layer_best_induction_stripe"),
    ]


_SINGLE_WHY = ("all four layer-1 heads are induction heads (stripe 0.77-0.82), so ablating one shows redundancy, "
               "not the absence of a mechanism; the criterion moves to ablating every induction head together")
_LN64 = math.log(64)  # V of the recipe (InductionConfig.vocab)


@check("induction", "head_ablation", "ablated_repeated_half_loss", threshold=None, kind="info",
       amended_from=amended((">=", 0.75 * _LN64), _SINGLE_WHY, AMENDED),
       other_metrics={
           "all_induction_heads_ablated_loss": Criterion.finding(
               ">=", 0.75 * _LN64, source=SPEC + "; " + ISSUE + ": 0.75 ln V, the spec's 'returns to about ln V'",
               after_observation=True, amended_from=amended(None, "was info; " + _SINGLE_WHY, AMENDED)),
           "random_heads_rise_ratio": Criterion.finding(
               "<", 0.5, source=ISSUE + ": as many random heads with stripe and previous-token score < 0.1 "
               "(mean over 5 draws) raise the loss by less than half the induction heads' rise",
               after_observation=True, amended_from=amended(None, "new control of the all-heads ablation", AMENDED)),
           "control_heads_available": None},
       baselines={"unablated": "repeated-half loss of the intact model", "uniform": "ln V",
                  "unfiltered": "random_heads_rise_ratio for heads drawn from every non-induction head (no score "
                                "filter, so the previous-token head can be drawn)"},
       description="mean-ablate (per-position means over the evaluation batch) every layer-1 head with induction "
                   "stripe > 0.5 together: the repeated-half loss returns near ln V; a control ablates as many "
                   "random heads that are neither induction nor previous-token heads; the best single head and "
                   "zero ablation are shown")
def induction_ablation(ctx) -> list[Result]:
    model, cfg, source = _induction_models(ctx)[2]
    tokens = induction.eval_batch(cfg)
    scores = head_scores(model, tokens, cfg.half_len, cfg.n_layers)
    stripe = scores["induction_stripe"]
    best = int(stripe[1].argmax())

    def metric(logits):
        return induction.repeated_half_loss(logits, tokens, cfg.half_len)

    sweeps = {kind: head_ablation_sweep(model, tokens, metric, kind, metric_name="repeated_half_loss")
              for kind in ("mean", "zero")}
    intact = _losses(model, tokens, cfg)
    heads = [(1, h) for h in range(cfg.n_heads) if stripe[1, h] > 0.5]
    single = _ablated_losses(model, tokens, cfg, [(1, best)])
    every = _ablated_losses(model, tokens, cfg, heads or [(1, best)])
    base = {"unablated": float(intact.mean()), "uniform": math.log(cfg.vocab)}
    common = {"model": source, "ablation": "mean (over the evaluation batch, per position)",
              "interval": "bootstrap over the evaluation sequences"}
    rows = [Result.mean(single, ctx.seed, baselines=base,
                      detail={**common, "head": [1, best], "zero_ablation_loss": float(sweeps["zero"].values[1, best]),
                              "sweeps": {k: v.to_dict() for k, v in sweeps.items()}}),
            Result.mean(every, ctx.seed, baselines=base, metric="all_induction_heads_ablated_loss",
                      detail={**common, "heads": [list(h) for h in heads]})]
    return rows + _random_head_control(ctx, model, tokens, cfg, scores, heads, every - intact, intact, common)


def _random_head_control(ctx, model, tokens, cfg, scores, heads, rise, intact, common) -> list[Result]:
    """Ablate ``len(heads)`` random heads with stripe and previous-token score < 0.1 (5 draws):
    mean rise over the draws / the induction heads' rise; info with a note when too few exist."""
    stripe, prev = scores["induction_stripe"], scores["previous_token"]
    every = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    eligible = [x for x in every if stripe[x] < 0.1 and prev[x] < 0.1]
    others = [x for x in every if x not in heads]
    k, gen = len(heads), torch.Generator().manual_seed(ctx.seed)

    def ratio(pool: list) -> tuple[float, tuple[float, float], list]:
        draws = [sorted(pool[i] for i in torch.randperm(len(pool), generator=gen)[:k].tolist()) for _ in range(5)]
        rises = torch.stack([_ablated_losses(model, tokens, cfg, d) - intact for d in draws]).mean(0)  # [batch]
        pair = torch.stack([rise, rises], 1)  # [batch, 2]: induction heads' rise, random heads' rise

        def stat(x):
            return x[:, 1].mean() / x[:, 0].mean()
        return float(stat(pair)), bootstrap_interval(pair, stat, seed=ctx.seed, resamples=1000), draws

    unfiltered = ratio(others)[0] if k and len(others) >= k else None
    base = {"unfiltered": unfiltered} if unfiltered is not None else {}
    detail = {**common, "needed": k, "eligible": [list(x) for x in eligible], "draws": 5,
              "induction_heads_rise": float(rise.mean())}
    rows = []
    if k and len(eligible) >= k:
        value, interval, draws = ratio(eligible)
        rows.append(Result(value, base, {**detail, "drawn": [[list(x) for x in d] for d in draws],
                                         "interval": "paired bootstrap over the evaluation sequences"},
                           metric="random_heads_rise_ratio", n=len(tokens), interval=interval))
    note = "" if rows else (f"n/a: {len(eligible)} heads have induction stripe and previous-token score < 0.1, "
                            f"{k} needed; the random-head control (random_heads_rise_ratio) is not available")
    rows.append(Result(float(len(eligible)), base, {**detail, "note": note} if note else detail,
                       metric="control_heads_available"))
    return rows


def _ablated_losses(model, tokens, cfg, heads: list[tuple[int, int]]) -> torch.Tensor:  # [batch]
    """Per-sequence repeated-half loss with ``heads`` mean-ablated together (per-position means over ``tokens``)."""
    sites = [aliases.head_out(model, layer, 0).replace(heads=sorted(h for lay, h in heads if lay == layer), name=None)
             for layer in sorted({lay for lay, _ in heads})]
    with torch.no_grad():
        views = cache(model, tokens, sites)
        out, _ = run(model, tokens, {site: Mean(views[site].mean(0)) for site in sites})
    return induction.repeated_half_losses(out, tokens, cfg.half_len).double()


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


def _ranking_rows(effects: torch.Tensor, labels: torch.Tensor, prefix: str, detail: dict) -> list[Result]:
    """AUC of |effects| for the circuit ``labels``, its exact p-value against random rankings."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"the circuit labels need members and non-members, got {n_pos} and {n_neg}")
    value = auc(effects.abs(), labels)
    base = {"random_ranking": 0.5, "random_ranking_p95": auc_random_quantile(0.95, n_pos, n_neg)}
    detail = {**detail, "members": n_pos, "non_members": n_neg,
              "min_attainable_p": auc_permutation_p(1.0, n_pos, n_neg)}
    return [Result(value, base, detail, metric=f"{prefix}_auc"),
            Result(auc_permutation_p(value, n_pos, n_neg), {}, detail, metric=f"{prefix}_auc_p_value")]


def _circuit_heads(scores: dict) -> torch.Tensor:  # [layers * heads], layer-major like _head_cells
    return ((scores["induction_stripe"] > 0.5) | (scores["previous_token"] > 0.5)).flatten()


_RANK_WHY = ("'the top layer-1 head is an induction head' cannot fail when all four layer-1 heads are induction "
             "heads; the ranking of every head must match the attention-defined circuit instead (AUC) against "
             "random rankings")


def _ranking_criteria(prefix: str, what: str, old: str, known_cause: str = "") -> dict[str, Criterion]:
    first = amended(("==", 1.0), f"replaces {old} == 1: " + _RANK_WHY, AMENDED)
    return {f"{prefix}_auc": Criterion.finding(
                ">=", 0.9, source=ISSUE + f": {what} ranked above the rest in nine of ten pairs",
                after_observation=True, amended_from=first, known_cause=known_cause),
            f"{prefix}_auc_p_value": Criterion.finding(
                "<", 0.05, source=ISSUE + ": the AUC must be one a random ranking reaches with probability < 0.05",
                after_observation=True, amended_from=first, known_cause=known_cause),
            old: Criterion.info(amended_from=amended(("==", 1.0), _RANK_WHY, AMENDED))}


def _register_identification(method: str, tool: Any, known_cause: str = "") -> None:
    """One check per tool: does ``tool`` (activation or attribution patching) rank the circuit's heads first?"""
    criteria = _ranking_criteria("circuit_head", "circuit heads (stripe or previous-token score > 0.5)",
                                 "prev_to_induction_identified", known_cause)

    @check("induction", method, "circuit_head_auc", threshold=criteria.pop("circuit_head_auc"),
           other_metrics=criteria,
           baselines={"random_ranking": "mean AUC of a uniformly random ranking",
                      "random_ranking_p95": "95th percentile of the AUC of a uniformly random ranking"},
           description=f"{method.replace('_', ' ')} of every head (noising: corrupt first copy patched into the "
                       "clean run; metric: logit difference on the repeat) ranks the circuit heads (induction "
                       "stripe > 0.5 or previous-token score > 0.5) above the others")
    def identification(ctx) -> list[Result]:
        model, cfg, source = _induction_models(ctx)[2]
        clean, corrupt, metric = _induction_patching_inputs(model, cfg)
        res = tool(model, clean, corrupt, _head_cells(model), metric, direction="noise")
        scores = head_scores(model, induction.eval_batch(cfg), cfg.half_len, cfg.n_layers)
        eff = res.effects.abs().view(cfg.n_layers, cfg.n_heads)
        top0, top1, prev = int(eff[0].argmax()), int(eff[1].argmax()), int(scores["previous_token"][0].argmax())
        old = (float(top0 == prev) + float(scores["induction_stripe"][1][top1] > 0.5)) / 2
        detail = {"model": source, "ablation": res.ablation, "effects": eff.tolist(), "n_sequences": len(clean),
                  "circuit_heads": [[i // cfg.n_heads, i % cfg.n_heads] for i in
                                    _circuit_heads(scores).nonzero()[:, 0].tolist()]}
        rows = _ranking_rows(res.effects.flatten(), _circuit_heads(scores), "circuit_head", detail)
        return rows + [Result(old, {}, {"model": source, "top_layer0": top0, "best_previous_token": prev,
                                        "top_layer1": top1}, metric="prev_to_induction_identified")]


_register_identification("activation_patching", patch_cells)
_register_identification("attribution_patching", attribution_patching, known_cause=(
    "attribution patching is the first-order estimate of the patch: it underrates some of the four redundant "
    "layer-1 induction heads (one by more than ten times against activation patching, see the effects in detail), "
    "which then rank below weak layer-0 heads"))

_EDGE_CRITERIA = _ranking_criteria("circuit_edge", "previous-token head -> K input of an induction head edges",
                                   "top_edge_is_prev_to_induction_k")


@check("induction", "path_patching", "circuit_edge_auc", threshold=_EDGE_CRITERIA.pop("circuit_edge_auc"),
       other_metrics=_EDGE_CRITERIA,
       baselines={"random_ranking": "mean AUC of a uniformly random ranking",
                  "random_ranking_p95": "95th percentile of the AUC of a uniformly random ranking"},
       description="path patching of every (layer-0 head -> layer-1 head's q, k or v input) edge ranks the edges "
                   "from a previous-token head (score > 0.5) into the K input of an induction head (stripe > 0.5) "
                   "above the others")
def induction_path(ctx) -> list[Result]:
    model, cfg, source = _induction_models(ctx)[2]
    clean, corrupt, metric = _induction_patching_inputs(model, cfg)
    edges = _edge_effects(model, clean, corrupt, metric)
    (sender, receiver, part), best = max(edges.items(), key=lambda kv: abs(kv[1]))
    scores = head_scores(model, induction.eval_batch(cfg), cfg.half_len, cfg.n_layers)
    prev, stripe = scores["previous_token"][0], scores["induction_stripe"][1]
    labels = torch.tensor([bool(prev[s] > 0.5) and p == "k" and bool(stripe[r] > 0.5) for (s, r, p) in edges])
    old = float(sender == int(prev.argmax()) and part == "k" and bool(stripe[receiver] > 0.5))
    detail = {"model": source, "ablation": "path patch corrupt->clean (noising)", "n_sequences": len(clean),
              "edges": {f"L0H{s}->L1H{r}.{p}": v for (s, r, p), v in edges.items()}}
    rows = _ranking_rows(torch.tensor(list(edges.values())), labels, "circuit_edge", detail)
    return rows + [Result(old, {}, {"model": source, "top_edge": [f"L0H{sender}", f"L1H{receiver}.{part}"],
                                    "effect": best, "best_previous_token": int(prev.argmax())},
                          metric="top_edge_is_prev_to_induction_k")]

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


@check("hand_set_circuit", "circuit_ranking", "head_auc_activation_patching", threshold=("==", 1.0), kind="check",
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
