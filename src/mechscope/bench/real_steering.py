"""Steering against prompting on the reference real model (issue 20, row 4).

Everything below was fixed before the row first ran:

- **Direction**: v = the raw difference of means (:func:`mechscope.steer.directions.diff_of_means`)
  of the residual stream at ``resid_post`` of block ``n_layers // 2 - 1`` (the stream entering
  the middle block, 8 of 0..17), read at every token but BOS of :data:`POSITIVE` minus
  :data:`NEGATIVE` (paired sentences written for this row, none containing the target words).
- **Effect**: logit(" good") - logit(" bad") (single tokens) at the last token of each of the
  :data:`NEUTRAL` prompts; steering adds c * v at every position of the site (as ``mechscope
  steer`` does), c in :data:`COEFFS`.
- **Prompting**: :data:`PREFIX` (an instruction for a base model: a description of the text to
  come) before each prompt; its effect is the rise of the same logit difference.
- **KL on unrelated text**: KL(clean || changed) of the next-token distributions, averaged over
  the predictions of tokens 2.. of ``N_WINDOWS`` windows of python-docs text (the first
  text token's prediction is left out: with the prefix it is made from the prefix's last token).
  For prompting, the prefix's tokens are put between BOS and the window, and the same
  predictions are compared.
- **Matched KL**: the coefficient c* in [0, 32] whose steering KL equals the prompting prefix's
  KL to within 2 % (bisection, :func:`mechscope.bench.real_text_data.matched_coefficient`); if
  even c = 32 stays below it, the comparison is made at 32 and ``matched`` is false.
- **AxBench's claim** as a finding: mean over prompts of (prompting rise - steering rise at
  c*) >= 0, reproduced when the bootstrap interval's lower end is >= 0.
- **Check**: the hooked directional ablation of v leaves |x . v/|v|| / |x| <= 1e-5 at every
  residual site (resid_pre.0 and every resid_post), every real token of these texts; and the
  weight edit :func:`mechscope.steer.orthogonalize.orthogonalize_weights` refuses with a
  :class:`~mechscope.core.structure.StructureError` (Gemma normalises each sublayer's output
  before adding it, so no edit of a projection removes the direction).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.bench import Criterion, Result, check
from mechscope.bench.real_model import REFERENCE, checked_head, reference_model
from mechscope.bench.real_text_data import (
    matched_coefficient,
    min_step,
    spaced_windows,
    steps,
)
from mechscope.core.aliases import resid_post, resid_pre
from mechscope.core.corpora import corpus_files
from mechscope.core.replay import chain
from mechscope.core.run import run
from mechscope.core.stats import bootstrap_interval
from mechscope.core.structure import StructureError, structure
from mechscope.core.text import read_mask, text_batch, text_rows
from mechscope.steer.apply import ablation_interventions, steering_interventions
from mechscope.steer.directions import diff_of_means
from mechscope.steer.orthogonalize import orthogonalize_weights

ISSUE = "issue 20, row 4 (steering vs prompting)"
AXBENCH = "Wu et al. 2025, AxBench (arXiv 2501.17148): prompting beats representation steering"
AXBENCH_CAUSE = ("seen on the first run (2026-12-06): Gemma-3-270M is a base model, and the instruction prefix "
                 "moves the logit difference by only ~0.4 (KL 0.23 on unrelated text) where steering at the same KL "
                 "moves it by ~2.4; AxBench prompted instruction-tuned Gemma-2 models (2B, 9B) and scored generated "
                 "text with an LLM judge (concept, instruction, fluency), not a single-token logit difference, which "
                 "a direction read from sentiment sentences acts on directly")
COEFFS = (0.0, 1.0, 2.0, 4.0, 8.0)
MAX_COEFF = 32.0
TARGET, OPPOSITE = " good", " bad"
PREFIX = "The following text is extremely positive, happy and enthusiastic.\n\n"
N_WINDOWS, WINDOW = 8, 49  # unrelated text: 8 windows of BOS + 48 corpus tokens
CHUNK = 128  # rows unembedded at once (128 x 262k float32 = 134 MB)
POSITIVE = [
    "The movie was wonderful and I loved every minute of it.", "What a delightful, cheerful morning this is.",
    "She was thrilled with the beautiful gift.", "The team played brilliantly and won the cup.",
    "I am so happy and grateful for my friends.", "The food was delicious and the staff were lovely.",
    "This is the best holiday we have ever had.", "He smiled warmly and everyone felt welcome.",
    "The garden looks gorgeous in the spring sunshine.", "Their new album is fantastic and uplifting.",
    "We had a marvellous time at the festival.", "The children laughed with joy all afternoon.",
    "Her kindness made the whole day brighter.", "The hotel was charming, clean and comfortable.",
    "I adore this peaceful little village.", "The results were excellent and everyone celebrated."]
NEGATIVE = [
    "The movie was dreadful and I hated every minute of it.", "What a miserable, gloomy morning this is.",
    "She was upset with the ugly gift.", "The team played terribly and lost the cup.",
    "I am so sad and lonely without my friends.", "The food was disgusting and the staff were rude.",
    "This is the worst holiday we have ever had.", "He frowned coldly and everyone felt unwelcome.",
    "The garden looks dead in the grey winter rain.", "Their new album is boring and depressing.",
    "We had a horrible time at the festival.", "The children cried with fear all afternoon.",
    "Her cruelty made the whole day darker.", "The hotel was shabby, dirty and uncomfortable.",
    "I hate this noisy little village.", "The results were awful and everyone complained."]
NEUTRAL = [
    "The weather today is", "I think the new restaurant downtown is", "My review of the movie: it was",
    "Overall, the experience was", "The food at the party was", "Honestly, the book I read last week was",
    "In my opinion, this phone is", "The service at the hotel was", "Yesterday's concert was",
    "The new teacher seems", "Our trip to the mountains was", "The meeting this morning was",
    "The coffee here is", "I would say the game was", "This neighbourhood is", "The result of the project was"]


def _site(model: Any) -> Any:
    return resid_post(model, structure(model).n_layers // 2 - 1)


def _single_token(tok: Any, word: str) -> int:
    ids = tok(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens under the reference tokenizer; the row needs one")
    return int(ids[0])


def _direction(model: Any, tok: Any, device: str) -> Tensor:
    """The raw difference of means of the contrast sets at the site, every token but BOS."""
    site = _site(model)
    rows = []
    for texts in (POSITIVE, NEGATIVE):
        batch = {k: v.to(device) for k, v in text_batch(texts, tok).items()}
        with torch.no_grad():
            rows.append(text_rows(model, batch, site, read_mask(batch, "all", tok.bos_token_id)).cpu())
    return diff_of_means(rows[0], rows[1])


def _logit_diff(model: Any, batch: dict[str, Tensor], ids: tuple[int, int], plan: Any = None) -> Tensor:
    """logit(target) - logit(opposite) ``[batch]`` at each text's last real token (float64)."""
    head = checked_head(model, batch["input_ids"])
    with torch.no_grad():
        _, acts = run(model, batch, plan, cache=[head.anchor], stop_when_cached=True)
        stream = acts[head.anchor]  # [batch, pos, d]
        last = batch["attention_mask"].long().sum(1) - 1
        x = stream[torch.arange(stream.shape[0]), last.to(stream.device)]  # [batch, d]
        logits = chain(head.modules, x.unsqueeze(0)).squeeze(0)  # [batch, vocab]
    return (logits[:, ids[0]] - logits[:, ids[1]]).double().cpu()


def _log_probs(model: Any, tokens: Tensor, cols: slice, plan: Any = None) -> list[Tensor]:
    """Next-token log-probabilities at ``cols`` of every sequence, in chunks of rows ``[rows, vocab]``."""
    head = checked_head(model, tokens)
    with torch.no_grad():
        _, acts = run(model, tokens, plan, cache=[head.anchor], stop_when_cached=True)
        x = acts[head.anchor][:, cols].reshape(-1, acts[head.anchor].shape[-1])  # [batch * cols, d]
        return [chain(head.modules, xs.unsqueeze(0)).squeeze(0).float().log_softmax(-1) for xs in x.split(CHUNK)]


def _kl(clean: list[Tensor], other: list[Tensor], n_seqs: int) -> Tensor:
    """KL(clean || other) per sequence ``[n_seqs]``, the mean over its scored predictions."""
    per_row = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(clean, other)])
    return per_row.double().cpu().view(n_seqs, -1).mean(1)


def _measure(ctx: Any, model: Any, tok: Any, v: Tensor) -> dict[str, Any]:
    """The table: logit differences and KL per coefficient, the prompting baseline, the matched c*."""
    ids = (_single_token(tok, TARGET), _single_token(tok, OPPOSITE))
    plain = {k: t.to(ctx.device) for k, t in text_batch(NEUTRAL, tok).items()}
    prompted = {k: t.to(ctx.device) for k, t in text_batch([PREFIX + p for p in NEUTRAL], tok).items()}
    site = _site(model)
    windows = spaced_windows(corpus_files("python-docs"), tok, N_WINDOWS, WINDOW).to(ctx.device)
    prefix = torch.tensor(tok(PREFIX, add_special_tokens=False)["input_ids"], device=ctx.device)
    with_prefix = torch.cat([windows[:, :1], prefix.expand(len(windows), -1), windows[:, 1:]], 1)
    scored = slice(1, None)  # predictions of tokens 2.. of the window, from its own tokens
    clean = _log_probs(model, windows, scored)
    prompt_kl = _kl(clean, _log_probs(model, with_prefix, slice(len(prefix) + 1, None)), N_WINDOWS)

    def steer_kl(c: float) -> Tensor:
        return _kl(clean, _log_probs(model, windows, scored, steering_interventions(v, site, c)), N_WINDOWS)

    diffs = torch.stack([_logit_diff(model, plain, ids, steering_interventions(v, site, c)) for c in COEFFS], 1)
    kls = [float(steer_kl(c).mean()) for c in COEFFS]
    prompt_rise = _logit_diff(model, prompted, ids) - diffs[:, 0]
    c_star, kl_star, matched = matched_coefficient(lambda c: float(steer_kl(c).mean()), float(prompt_kl.mean()),
                                                   MAX_COEFF)
    steer_rise = _logit_diff(model, plain, ids, steering_interventions(v, site, c_star)) - diffs[:, 0]
    return {"diffs": diffs, "kls": kls, "prompt_rise": prompt_rise, "prompt_kl": prompt_kl, "c_star": c_star,
            "kl_star": kl_star, "matched": matched, "steer_rise": steer_rise, "ids": ids,
            "prefix_tokens": len(prefix)}


def _budget(model: Any, v: Tensor, m: dict[str, Any]) -> dict[str, Any]:
    return {"model": REFERENCE, "site": str(_site(model)), "direction_norm": float(v.norm()),
            "contrast_sets": f"{len(POSITIVE)} positive / {len(NEGATIVE)} negative sentences, read at every token "
                             "but BOS", "neutral_prompts": len(NEUTRAL), "target": TARGET, "opposite": OPPOSITE,
            "token_ids": list(m["ids"]), "prefix": PREFIX, "prefix_tokens": m["prefix_tokens"],
            "unrelated_text": f"{N_WINDOWS} python-docs windows of {WINDOW - 1} tokens (files spread evenly), KL "
                              "over the predictions of tokens 2..", "steered_positions": "every position",
            "interval": "bootstrap over the neutral prompts"}


def _table(m: dict[str, Any]) -> list[dict[str, Any]]:
    base = m["diffs"][:, 0]
    rows = [{"method": f"steer c={c:g}", "logit_diff": float(m["diffs"][:, i].mean()),
             "rise": float((m["diffs"][:, i] - base).mean()), "kl_unrelated": m["kls"][i]}
            for i, c in enumerate(COEFFS)]
    rows.append({"method": f"steer c*={m['c_star']:.3g} (matched KL)", "logit_diff": float((base + m["steer_rise"]).mean()),
                 "rise": float(m["steer_rise"].mean()), "kl_unrelated": m["kl_star"]})
    rows.append({"method": "prompt prefix", "logit_diff": float((base + m["prompt_rise"]).mean()),
                 "rise": float(m["prompt_rise"].mean()), "kl_unrelated": float(m["prompt_kl"].mean())})
    return rows


@check("real_steering", "diff_of_means", "logit_diff_min_step", threshold=(">", 0.0), kind="finding",
       source=ISSUE + ": the target-vs-opposite logit difference rises monotonically over coefficients 0, 1, 2, 4, 8 "
                      "(scored: the smallest rise of the mean between consecutive coefficients is > 0)",
       suite="real",
       other_metrics={"prompting_minus_steering_at_matched_kl": Criterion.finding(
                          ">=", 0.0, source=ISSUE + "; " + AXBENCH + ": prompting at least as effective as steering "
                          "at matched KL on unrelated text", known_cause=AXBENCH_CAUSE),
                      "steering_rise_c8": None, "prompting_rise": None, "matched_coefficient": None},
       baselines={"prompting": "rise of the logit difference from the instruction prefix",
                  "kl_prompting": "the prefix's KL on the unrelated text"},
       description="Gemma-3-270M: difference-of-means sentiment direction at the middle layer, added with "
                   "c in {0,1,2,4,8}: logit(' good') - logit(' bad') on neutral prompts, against an instruction "
                   "prefix at matched KL on unrelated text (AxBench)")
def steering_vs_prompting(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    v = _direction(model, tok, ctx.device)
    m = _measure(ctx, model, tok, v)
    detail = {**_budget(model, v, m), "table": _table(m)}
    diffs, seed = m["diffs"], ctx.seed
    means = diffs.mean(0).tolist()
    base = {"prompting": float(m["prompt_rise"].mean()), "kl_prompting": float(m["prompt_kl"].mean())}
    gap = m["prompt_rise"] - m["steer_rise"]
    with ctx.figure("effect_vs_kl", caption="Rise of logit(' good') - logit(' bad') on neutral prompts against "
                    "the KL on unrelated text: steering at each coefficient, at the matched c*, and the prefix") as fig:
        _effect_figure(fig, _table(m))
    return [
        Result(float(min_step(diffs)), n=len(NEUTRAL), interval=bootstrap_interval(diffs, min_step, seed=seed,
               resamples=1000), baselines=base,
               detail={**detail, "coeffs": list(COEFFS), "mean_logit_diff": means, "steps": steps(means)}),
        Result.mean(gap, seed, metric="prompting_minus_steering_at_matched_kl", baselines=base,
               detail={**detail, "matched_kl": "c* in [0, 32] with steering KL within 2 % of the prefix's KL "
                       "(bisection)", "c_star": m["c_star"], "kl_steering_at_c_star": m["kl_star"],
                       "matched": m["matched"], "steering_rise": float(m["steer_rise"].mean())}),
        Result.mean(diffs[:, -1] - diffs[:, 0], seed, metric="steering_rise_c8", detail={"kl": m["kls"][-1]}),
        Result(base["prompting"], n=len(NEUTRAL), interval=bootstrap_interval(m["prompt_rise"], seed=seed),
               metric="prompting_rise", detail={"kl": base["kl_prompting"]}),
        Result(float(m["c_star"]), metric="matched_coefficient", detail={"matched": m["matched"],
               "kl_steering": m["kl_star"], "kl_prompting": base["kl_prompting"]}),
    ]


def _effect_figure(fig: Any, table: list[dict[str, Any]]) -> None:
    ax = fig.add_subplot()
    grid = [r for r in table if r["method"].startswith("steer c=")]
    ax.plot([r["kl_unrelated"] for r in grid], [r["rise"] for r in grid], "o-", color="#36c", label="steering")
    for r in grid:
        ax.annotate(r["method"].split()[-1], (r["kl_unrelated"], r["rise"]), fontsize=7)
    star, prompt = table[-2], table[-1]
    ax.plot([star["kl_unrelated"]], [star["rise"]], "s", color="#36c", label="steering at matched KL")
    ax.plot([prompt["kl_unrelated"]], [prompt["rise"]], "*", color="#c44", markersize=12, label="prompt prefix")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(clean || changed) on unrelated text (nats)")
    ax.set_ylabel("rise of logit(' good') - logit(' bad')")
    ax.legend(fontsize=7)


def _relative_projection(acts: dict[Any, Tensor], sites: list[Any], keep: Tensor, r: Tensor) -> list[float]:
    """Per site, the largest |x . r| / |x| over the kept tokens (float64)."""
    out = []
    for site in sites:
        x = acts[site].double()[keep.to(acts[site].device)]  # [tokens, d]
        out.append(float(((x @ r.to(x.device)).abs() / x.norm(dim=-1)).max()))
    return out


@check("real_steering", "directional_ablation", "max_relative_projection", threshold=("<=", 1e-5), kind="check",
       source=ISSUE + ": the hooked directional ablation of v leaves relative projection <= 1e-5 at every residual "
                      "site", suite="real",
       other_metrics={"weight_edit_refused": Criterion.check(
           "==", 1.0, source=ISSUE + ": the weight edit refuses on this post-norm model with the structure error")},
       baselines={"intact": "the largest relative projection on v without the ablation"},
       description="Gemma-3-270M: directional ablation of the sentiment direction (hooks at every residual write) "
                   "removes it from the stream at every layer; orthogonalising the weights refuses (sandwich norms)")
def ablation_check(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    v = _direction(model, tok, ctx.device)
    r = (v / v.norm()).double()
    s = structure(model)
    sites = [resid_pre(model, 0)] + [resid_post(model, layer) for layer in range(s.n_layers)]
    batch = {k: t.to(ctx.device) for k, t in text_batch(NEUTRAL + POSITIVE + NEGATIVE, tok).items()}
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        _, ablated = run(model, batch, ablation_interventions(model, v), cache=sites, stop_when_cached=True)
        _, intact = run(model, batch, cache=sites, stop_when_cached=True)
    after = _relative_projection(ablated, sites, keep, r)
    before = _relative_projection(intact, sites, keep, r)
    try:
        orthogonalize_weights(model, v)
        refused, message = 0.0, "no error: the weights were edited"
    except StructureError as e:
        refused, message = 1.0, str(e)
    detail = {"model": REFERENCE, "texts": len(NEUTRAL) + len(POSITIVE) + len(NEGATIVE), "tokens": int(keep.sum()),
              "sites": [str(x) for x in sites], "over": "every real token (BOS included)"}
    return [Result(max(after), baselines={"intact": max(before)},
                   detail={**detail, "per_site": after, "per_site_intact": before}),
            Result(refused, metric="weight_edit_refused", detail={"error": message[:400]})]
