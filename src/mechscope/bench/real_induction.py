"""Induction heads in the reference real model (issue 20, row 1): random tokens repeated once.

Every sequence is BOS, then ``PERIOD`` distinct tokens, then the same tokens again. The
tokens come from the 10,000 most frequent tokens of the suite's corpus, as the issue asks
(``python-docs``: ``mechscope corpus install python-docs``, run by ``make bench-real``).
Where the corpus is not installed they come from the first 10,000 vocabulary ids that are
plain lowercase ASCII word starts (:func:`mechscope.bench.real_data.ascii_word_ids`: merge
order stands in for frequency), with a warning; the rows' detail says which pool was used. The whole sequence (``1 + 2 * PERIOD``
positions) lies well inside the sliding window of Gemma's local layers (checked against
the model's config, so every layer sees the first copy).

Pre-registered before the first run (thresholds from issue 20, the stripe score from Olsson
et al. 2022), on ``N_SEQS`` sequences of period ``PERIOD``:

- the second copy's loss is at most 0.3 x the first copy's (ratio of the means, paired
  bootstrap over the sequences);
- some head has induction stripe >= 0.4 (mean attention from the repeat's queries to the
  token after the earlier occurrence of the current token);
- zero-ablating the three heads with the highest stripe together raises the second-copy
  loss by >= 1 nat; zero-ablating three random heads with stripe < 0.1 raises it by
  < 0.5 nat (mean over 5 draws).

A finding is reproduced only when its whole bootstrap interval clears the threshold.
Losses are read from the last block's output at the scored positions only
(:func:`mechscope.bench.real_model.token_losses`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mechscope.bench import Criterion, Result, check
from mechscope.bench import toy_figures as figures
from mechscope.bench.real_data import (
    ascii_word_ids,
    control_draws,
    frequent_ids,
    half_slices,
    repeated_tokens,
    top_heads,
)
from mechscope.bench.real_model import REFERENCE, reference_model, token_losses
from mechscope.circuits.composition import (
    composition_scores,
    head_weights,
    random_baseline,
)
from mechscope.circuits.heads import (
    attention_patterns,
    induction_score,
    previous_token_score,
)
from mechscope.core import aliases
from mechscope.core.corpora import CorpusError, corpus_files
from mechscope.core.intervene import Mean, Zero
from mechscope.core.run import cache
from mechscope.core.stats import bootstrap_interval
from mechscope.core.text import token_stream

ISSUE = "issue 20, row 1 (the real-model suite)"
OLSSON = "Olsson et al. 2022, 'In-context Learning and Induction Heads' (stripe / prefix-matching score)"
N_SEQS, PERIOD, POOL = 20, 48, 10_000
TOP_K, CONTROL_BELOW, CONTROL_DRAWS = 3, 0.1, 5
CORPUS = "python-docs"
POOL_NOTES = {
    "corpus": f"tokens drawn from the {POOL} most frequent tokens of the {CORPUS} corpus (special tokens left out)",
    "stand-in": (f"tokens drawn from the first {POOL} vocabulary ids that are lowercase ASCII word starts, a stand-in "
                 f"for the corpus's {POOL} most frequent tokens: the {CORPUS} corpus is not installed (`mechscope "
                 "corpus install python-docs`); SentencePiece ids follow merge order, which follows frequency"),
}

_DATA: dict[tuple[int, str], dict[str, Any]] = {}


def _budget(model: Any, pool: str) -> dict[str, Any]:
    window = getattr(model.config, "sliding_window", None)
    length = 1 + 2 * PERIOD
    if window is not None and length > window // 4:
        raise ValueError(f"sequences of {length} positions are not well inside the sliding window ({window})")
    return {"model": REFERENCE, "sequences": N_SEQS, "period": PERIOD, "seq_len": length, "sliding_window": window,
            "pool": POOL_NOTES[pool], "interval": "bootstrap over the sequences"}


def _pool(ctx: Any, tok: Any) -> tuple[list[int], str]:
    """The token ids the sequences draw from, and which pool that is (a key of POOL_NOTES)."""
    try:
        files = corpus_files(CORPUS)
    except CorpusError as e:
        ctx.log.warning(f"{e}; drawing from the ASCII-word stand-in instead")
        return ascii_word_ids(tok.convert_ids_to_tokens(list(range(len(tok)))), POOL), "stand-in"
    return frequent_ids(token_stream(files, tok), POOL, exclude=tok.all_special_ids), "corpus"


def _data(ctx: Any, model: Any, tok: Any) -> dict[str, Any]:
    """Tokens, per-sequence stripe scores and intact losses, computed once per (seed, device)."""
    key = (ctx.seed, ctx.device)
    if key not in _DATA:
        pool, which = _pool(ctx, tok)
        tokens = repeated_tokens(pool, N_SEQS, PERIOD, int(tok.bos_token_id), ctx.seed).to(ctx.device)
        with torch.no_grad():
            pats = attention_patterns(model, tokens).cpu()  # [layers, batch, heads, q, k]
        stripes = induction_score(pats.unsqueeze(2), PERIOD)  # [layers, batch, heads]
        first, second = half_slices(PERIOD)
        losses = token_losses(model, tokens, slice(None))  # [batch, 2 * PERIOD]
        _DATA[key] = {"pool": which, "tokens": tokens, "stripes": stripes, "previous_token": previous_token_score(pats),
                      "first": losses[:, first].mean(1), "second": losses[:, second].mean(1),
                      "pattern": pats[:, 0]}  # [layers, heads, q, k] of the first sequence, for the figure
    return _DATA[key]



def _ratio(second: Tensor, first: Tensor) -> Tensor:
    return second.mean() / first.mean()


@check("real_induction", "repeated_tokens", "second_half_loss_ratio", threshold=("<=", 0.3), kind="finding",
       source=ISSUE + ": second-half loss <= 0.3 x first-half loss", suite="real",
       other_metrics={"best_induction_stripe": Criterion.finding(">=", 0.4, source=ISSUE + "; score: " + OLSSON),
                      "first_half_loss": None, "second_half_loss": None,
                      "top_head_k_composition": Criterion.info(source=ISSUE + ": composition scores of the top "
                                                               "induction head with earlier heads, information")},
       baselines={"uniform_pool": "ln 10000: an even guess over the pool the tokens are drawn from",
                  "median_head": "the median head's stripe score",
                  "random_q99": "99th percentile of the composition score of random matrices of the same shapes"},
       description="Gemma-3-270M on BOS + 48 random tokens repeated once: the repeat is predicted (loss ratio of "
                   "the second copy to the first) and some head attends along the induction stripe")
def induction_losses(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    data = _data(ctx, model, tok)
    budget = _budget(model, data["pool"])
    first, second, stripes = data["first"], data["second"], data["stripes"]
    pair = torch.stack([second, first], 1)  # [batch, 2]
    interval = bootstrap_interval(pair, lambda x: _ratio(x[:, 0], x[:, 1]), seed=ctx.seed, resamples=1000)
    mean_stripe = stripes.mean(1)  # [layers, heads]
    (layer, head), = top_heads(mean_stripe, 1)
    with ctx.figure("stripe_map", caption="Induction stripe and previous-token scores of every head "
                    "(layer x head) on the repeated random tokens", figsize=(9.0, 4.2)) as fig:
        _score_maps(fig, {"induction stripe": mean_stripe, "previous-token score": data["previous_token"]})
    with ctx.figure("pattern", caption=f"Attention of L{layer}H{head} on the first sequence") as fig:
        figures.attention_heads(fig, data["pattern"][layer, head:head + 1], [f"L{layer}H{head}"])
    loss_on = {"first_half_loss": "tokens r_2..r_P of the first copy", "second_half_loss": "r_2..r_P of the second"}
    return [
        Result(float(_ratio(second, first)), detail={**budget, **loss_on, "interval": "paired bootstrap over the "
               "sequences (ratio of means)"}, n=N_SEQS, interval=interval),
        Result.mean(stripes[layer, :, head], ctx.seed, metric="best_induction_stripe",
                  baselines={"median_head": float(mean_stripe.median())},
                  detail={**budget, "head": [layer, head], "stripe": mean_stripe.tolist(),
                          "previous_token": data["previous_token"].tolist(),
                          "note": "head chosen on the whole batch; the interval is over its per-sequence scores"}),
        Result.mean(first, ctx.seed, metric="first_half_loss", baselines={"uniform_pool": math.log(POOL)},
                  detail={**budget, "loss_on": loss_on["first_half_loss"]}),
        Result.mean(second, ctx.seed, metric="second_half_loss", baselines={"uniform_pool": math.log(POOL)},
                  detail={**budget, "loss_on": loss_on["second_half_loss"]}),
        _composition_row(model, (layer, head), data["previous_token"], ctx.seed),
    ]


def _composition_row(model: Any, top: tuple[int, int], previous: Tensor, seed: int) -> Result:
    """Q-, K- and V-composition of the top induction head with every head of an earlier layer
    (weights only, Elhage et al. 2021); the value is the largest K-composition score."""
    layer, head = top
    if layer == 0:
        return Result(0.0, detail={"note": "the top induction head is in layer 0: no earlier heads"},
                      metric="top_head_k_composition")
    weights = [head_weights(model, la) for la in range(layer + 1)]
    scores = {kind: composition_scores(weights, kind) for kind in "qkv"}
    # NaN marks a head with all-zero weights: it composes with nothing
    k_scores = scores["k"].scores[:layer, :, layer, head].nan_to_num(-1.0)  # [earlier layers, heads]
    (src_layer, src_head), = top_heads(k_scores, 1)
    hw = weights[0]
    shape = (hw.W_Q.shape[1], hw.W_Q.shape[2])
    baseline = random_baseline(shape, shape, n=32, generator=torch.Generator().manual_seed(seed))
    return Result(float(k_scores.max()), baselines={"random_q99": float(torch.quantile(baseline, 0.99))},
                  metric="top_head_k_composition",
                  detail={"head": [layer, head], "with": [src_layer, src_head],
                          "with_previous_token_score": float(previous[src_layer, src_head]),
                          "scores": {k: v.scores[:layer, :, layer, head].tolist() for k, v in scores.items()},
                          "random_samples": 32, "caveats": list(scores["k"].caveats)})


def ablated_second_half(model: Any, tokens: Tensor, heads: list[tuple[int, int]], kind: str = "zero") -> Tensor:
    """Per-sequence second-copy loss ``[batch]`` with ``heads`` ablated together: their slices
    of the output projection's input set to zero, or (``"mean"``) to their mean over the
    sequences at each position."""
    sites = [aliases.head_out(model, layer, 0).replace(heads=tuple(sorted(h for la, h in heads if la == layer)),
                                                       name=None)
             for layer in sorted({la for la, _ in heads})]
    if kind == "zero":
        plan = {site: Zero() for site in sites}
    else:
        with torch.no_grad():
            views = cache(model, tokens, sites)
        plan = {site: Mean(views[site].mean(0)) for site in sites}
    return token_losses(model, tokens, half_slices(PERIOD)[1], plan).mean(1)


@check("real_induction", "head_ablation", "top3_zero_ablation_rise", threshold=(">=", 1.0), kind="finding",
       source=ISSUE + ": zero-ablating the three heads with the highest stripe raises second-half loss by >= 1 nat",
       suite="real",
       other_metrics={"random3_zero_ablation_rise": Criterion.finding(
                          "<", 0.5, source=ISSUE + ": three random heads with stripe < 0.1 raise it by < 0.5 nat "
                          "(mean over 5 draws)"),
                      "control_heads_available": None,
                      "top3_mean_ablation_rise": Criterion.info(
                          source="added after the first run, as information: Gemma normalises the attention output "
                                 "(post-attention norm) before adding it, so zero-ablating two of a layer's four "
                                 "heads rescales the others; mean ablation keeps that scale")},
       baselines={"intact": "second-half loss of the intact model",
                  "first_half": "loss on the first (unpredictable) copy"},
       description="zero-ablate the top-3 stripe heads of Gemma-3-270M together, against 5 draws of three random "
                   "heads with stripe < 0.1: rise of the second copy's loss (nats)")
def induction_ablation(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    data = _data(ctx, model, tok)
    budget = _budget(model, data["pool"])
    tokens, intact = data["tokens"], data["second"]
    mean_stripe = data["stripes"].mean(1)  # [layers, heads]
    top = top_heads(mean_stripe, TOP_K)
    eligible, draws = control_draws(mean_stripe, TOP_K, CONTROL_BELOW, CONTROL_DRAWS, ctx.seed, exclude=top)
    rise_top = ablated_second_half(model, tokens, top) - intact  # [batch]
    rise_mean = ablated_second_half(model, tokens, top, "mean") - intact
    base = {"intact": float(intact.mean()), "first_half": float(data["first"].mean())}
    detail = {**budget, "ablation": "zero", "heads": [list(h) for h in top],
              "stripes": [float(mean_stripe[h]) for h in top]}
    rows = [Result.mean(rise_top, ctx.seed, baselines=base, detail=detail),
            Result.mean(rise_mean, ctx.seed, baselines=base, metric="top3_mean_ablation_rise",
                      detail={**detail, "ablation": "mean (per position, over the sequences)"})]
    draw_rises: list[float] = []
    if draws:
        rises = torch.stack([ablated_second_half(model, tokens, d) - intact for d in draws])  # [draws, batch]
        draw_rises = rises.mean(1).tolist()
        rows.append(Result.mean(rises.mean(0), ctx.seed, metric="random3_zero_ablation_rise", baselines=base,
                              detail={**budget, "ablation": "zero", "drawn": [[list(h) for h in d] for d in draws],
                                      "per_draw": draw_rises, "eligible": len(eligible)}))
    note = {} if draws else {"note": f"n/a: only {len(eligible)} heads have stripe < {CONTROL_BELOW}; "
                                     f"{TOP_K} needed, so the random-head control is not available"}
    rows.append(Result(float(len(eligible)), detail={**budget, **note}, metric="control_heads_available"))
    with ctx.figure("ablation_bars", caption="Rise of the second copy's loss when three heads are zero-ablated "
                    "together: the top-3 stripe heads (zero and mean ablation), and 5 draws of random heads with stripe < 0.1 "
                    "(zero)") as fig:
        _ablation_bars(fig, top, [float(rise_top.mean()), float(rise_mean.mean())], draws, draw_rises)
    return rows


def _score_maps(fig: Any, scores: dict[str, Tensor]) -> None:
    """One heat map per score, layers along x (18 layers of 4 heads read better lying down)."""
    for i, (name, s) in enumerate(scores.items()):
        ax = fig.add_subplot(len(scores), 1, i + 1)
        ax.imshow(s.T.numpy(), cmap="Greens", vmin=0, vmax=1, aspect="auto")
        for layer in range(s.shape[0]):
            for head in range(s.shape[1]):
                ax.text(layer, head, f"{float(s[layer, head]):.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(s.shape[0]))
        ax.set_yticks(range(s.shape[1]))
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("head", fontsize=8)


def _ablation_bars(fig: Any, top: list[tuple[int, int]], top_rises: list[float], draws: list,
                   draw_rises: list[float]) -> None:
    ax = fig.add_subplot()
    heads = "\n".join(f"L{la}H{h}" for la, h in top)
    labels = [f"top 3, zero\n{heads}", f"top 3, mean\n{heads}"]
    labels += [f"draw {i + 1}\n" + "\n".join(f"L{la}H{h}" for la, h in d) for i, d in enumerate(draws)]
    ax.bar(range(len(labels)), [*top_rises, *draw_rises], color=["#c44", "#e99"] + ["#888"] * len(draw_rises))
    ax.axhline(1.0, color="#c44", linestyle="--", linewidth=1, label="top-3 criterion (>= 1 nat)")
    ax.axhline(0.5, color="#444", linestyle=":", linewidth=1, label="control criterion (< 0.5 nat)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("rise of second-half loss (nats)")
    ax.legend(fontsize=7)
