"""A TopK sparse autoencoder on the reference model's residual stream (issue 20, row 3).

The dictionary is trained from an activation store written from the corpus
(:mod:`mechscope.bench.real_sae_store`: ``resid_post.8``, the stream after 9 of 18 blocks,
over the corpus's first 2^20 tokens, BOS rows left out; cached between runs like the model,
its build timed apart) and scored on held-out text: the ``HELD_WINDOWS`` windows that follow
the store's in the corpus.

Pre-registered before the first run (thresholds from issue 20; the architecture and its
defaults from Gao et al. 2024; the metrics as in SAELens and Gemma Scope), with this budget:
TopK, d_sae = 8 x d_model = 5120, k = 32, AuxK against dead latents, the library's TopK
defaults (lr 2e-4 / sqrt(d_sae / 2^14), Adam (0.9, 0.999), unit-norm decoder, inputs scaled
to unit mean squared norm), batches of 4096 rows, ``EPOCHS`` passes over the store's
1,040,384 rows; held out: 64 windows of 128 tokens (8,128 predicted tokens).

- FVU on the held-out rows (BOS excluded) <= 0.2: ``sum ||x - x_hat||^2 / sum ||x - mean||^2``;
- CE loss recovered >= 0.85 with the dictionary spliced in at every position but BOS, CE
  over every predicted token: ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, zero-ablation
  at the same positions;
- delta loss (``CE_sae - CE_clean``, nats), L0 and the dead fraction (latents that never
  fired in training; and on the held-out text) as information.

Intervals bootstrap over the held-out windows (ratios of sums recomputed per resample).
Feature pages for ``N_PAGES`` latents drawn at random among those live on the held-out text
are attached to the report. Losses come from the last block's output through the checked
head, unembedding chunks of rows (:func:`mechscope.bench.real_model.token_losses`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from mechscope.bench import Criterion, Result, check
from mechscope.bench.real_model import REFERENCE, reference_model, token_losses
from mechscope.bench.real_sae_store import (
    CORPUS,
    LAYER,
    SEQ_LEN,
    STORE_TOKENS,
    STORE_WINDOWS,
    cached_store,
    fvu_of,
    recovered_of,
    sae_site,
)
from mechscope.core.corpora import corpus_files
from mechscope.core.intervene import Apply, Zero
from mechscope.core.run import cache
from mechscope.core.stats import bootstrap_interval
from mechscope.sae.arch import SAE, SAEConfig
from mechscope.sae.data import store_batches
from mechscope.sae.pages import feature_sheet
from mechscope.sae.text_data import TextSource
from mechscope.sae.train import TrainConfig, train

ISSUE = "issue 20, row 3 (SAE on the real residual stream)"
GAO = "Gao et al. 2024, 'Scaling and evaluating sparse autoencoders' (TopK, AuxK, FVU)"
CE_SOURCE = "CE loss recovered as in SAELens / Gemma Scope (Lieberum et al. 2024): zero-ablation reference"
EXPANSION, K, BATCH, EPOCHS = 8, 32, 4096, 3
HELD_WINDOWS, EVAL_BATCH = 64, 8
N_PAGES, PAGE_EXAMPLES = 20, 8
RESAMPLES = 1000


def _budget(store_rows: int, steps: int, d_model: int) -> dict[str, Any]:
    return {"model": REFERENCE, "site": f"resid_post.{LAYER}", "corpus": CORPUS, "store_tokens": STORE_TOKENS,
            "store_rows": store_rows, "seq_len": SEQ_LEN, "arch": "topk", "d_sae": EXPANSION * d_model, "k": K,
            "batch": BATCH, "steps": steps, "epochs": EPOCHS, "held_out_windows": HELD_WINDOWS,
            "held_out_after_window": STORE_WINDOWS, "interval": "bootstrap over the held-out windows"}


def _train(ctx: Any, store: Any, d_model: int) -> tuple[SAE, Any, list[dict[str, float]], float, int]:
    steps = EPOCHS * store.n_rows // BATCH
    cfg = TrainConfig(steps=steps, batch_size=BATCH, seed=ctx.seed, progress=False, log_every=max(1, steps // 8))
    t0 = time.perf_counter()
    out = train(SAEConfig(d_in=d_model, d_sae=EXPANSION * d_model, arch="topk", k=K), cfg,
                (rows.float() for rows in store_batches(store, store.sites[0], BATCH, seed=ctx.seed)),
                on_log=lambda m, _: ctx.log.info(f"SAE step {int(m['step'])}: FVU {m['fvu']:.4f} L0 {m['l0']:.1f}"))
    return out.sae, out.trainer, out.history, time.perf_counter() - t0, steps


def _held_out(tok: Any) -> Tensor:
    """``[HELD_WINDOWS, SEQ_LEN]``: the windows after the store's, in corpus order."""
    text = TextSource(corpus_files(CORPUS), seq_len=SEQ_LEN)
    windows = list(text.windows(tok, skip=STORE_WINDOWS, limit=HELD_WINDOWS, shuffle=False))
    if len(windows) < HELD_WINDOWS:
        raise ValueError(f"the corpus has {len(windows)} windows after the store's {STORE_WINDOWS}, not {HELD_WINDOWS}")
    return torch.stack(windows)


def _reconstruction(model: Any, sae: SAE, site: Any, tokens: Tensor) -> dict[str, Tensor]:
    """Per window: squared error, rows, sum of rows, sum of squared norms, active latents; and
    which latents fired anywhere. Position 0 (BOS) is left out."""
    parts: dict[str, list[Tensor]] = {"err": [], "n": [], "sum": [], "sq": [], "l0": []}
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for chunk in tokens.split(EVAL_BATCH):
            x = cache(model, chunk, [site])[site][:, 1:].double()  # [w, pos - 1, d]
            f = sae.encode(x.float())  # [w, pos - 1, d_sae]
            x_hat = sae.decode(f).double()
            parts["err"].append((x - x_hat).pow(2).sum((1, 2)))
            parts["n"].append(torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64))
            parts["sum"].append(x.sum(1))
            parts["sq"].append(x.pow(2).sum((1, 2)))
            parts["l0"].append((f != 0).sum(-1).double().sum(1))
            fired |= (f != 0).reshape(-1, sae.d_sae).any(0)
    return {**{k: torch.cat(v) for k, v in parts.items()}, "fired": fired}


def _losses(model: Any, sae: SAE, site: Any, tokens: Tensor) -> Tensor:
    """``[w, 3]``: per window, summed next-token losses clean, zero-ablated and spliced, at every
    position but BOS."""
    spliced = site.replace(positions=slice(1, None))
    plans = [None, {spliced: Zero()}, {spliced: Apply(lambda v: sae(v.float()).to(v.dtype))}]
    out = []
    for chunk in tokens.split(EVAL_BATCH):
        out.append(torch.stack([token_losses(model, chunk, slice(None), plan).sum(1) for plan in plans], 1))
    return torch.cat(out)


def _not_bos(tokens: Tensor) -> Tensor:
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False  # the attention sink: not a row of the dictionary's training data either
    return keep


def _pages(ctx: Any, model: Any, tok: Any, sae: SAE, site: Any, tokens: Tensor, fired: Tensor) -> list[int]:
    live = fired.nonzero().flatten()
    gen = torch.Generator().manual_seed(ctx.seed)
    chosen = sorted(live[torch.randperm(len(live), generator=gen)[:N_PAGES]].tolist())
    page = feature_sheet(model, sae, site, list(tokens.split(EVAL_BATCH)), chosen, n_examples=PAGE_EXAMPLES,
                         token_str=lambda i: tok.decode([i]), row_mask=_not_bos,
                         title=f"{N_PAGES} random live latents of the TopK SAE at resid_post.{LAYER} (held-out text)")
    ctx.add_html(page, "feature_pages", caption=f"Feature pages: {N_PAGES} latents drawn at random among those live "
                 "on the held-out text; top-activating contexts (the token outlined), activation histogram, "
                 "tokens promoted and suppressed through the unembedding")
    return chosen


@check("real_sae", "topk_resid", "fvu", threshold=("<=", 0.2), kind="finding", suite="real",
       source=ISSUE + ": FVU <= 0.2 on held-out text; " + GAO,
       other_metrics={"ce_loss_recovered": Criterion.finding(">=", 0.85, source=ISSUE + ": CE loss recovered >= "
                                                             "0.85, spliced at every position except BOS; " + CE_SOURCE),
                      "delta_loss": None, "l0": None, "dead_fraction": None, "train_seconds": None},
       baselines={"zero_ablation_ce": "CE with the site zero-ablated at the same positions",
                  "clean_ce": "the model's own CE on the held-out windows"},
       description="Gemma-3-270M: a TopK SAE (8 x d_model, k = 32) trained from a store of the residual stream "
                   "after 9 of 18 blocks over 2^20 corpus tokens, scored on held-out text")
def topk_resid(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    store, build = cached_store(model, tok, REFERENCE, ctx.log)
    if build["built"]:
        ctx.record_cache_build("activation store", build["seconds"])
    site, d = sae_site(model), int(model.config.hidden_size)
    sae, trainer, history, seconds, steps = _train(ctx, store, d)
    budget = {**_budget(store.n_rows, steps, d), "store_build": build}
    held = _held_out(tok).to(ctx.device)
    rec = _reconstruction(model, sae, site, held)
    cols = torch.cat([torch.stack([rec["err"], rec["n"], rec["sq"]], 1), rec["sum"]], 1)  # [w, 3 + d]
    losses = _losses(model, sae, site, held)  # [w, 3]
    per_token = losses / rec["n"][:, None]  # [w, 3] mean loss per window
    clean, zero = float(losses[:, 0].sum() / rec["n"].sum()), float(losses[:, 1].sum() / rec["n"].sum())
    never = float((trainer.since_fired >= trainer.tokens).float().mean())
    pages = _pages(ctx, model, tok, sae, site, held, rec["fired"])
    ci = {"seed": ctx.seed, "resamples": RESAMPLES}
    n = HELD_WINDOWS
    return [
        Result(float(fvu_of(cols, d)), n=n, interval=bootstrap_interval(cols, lambda x: fvu_of(x, d), **ci),
               detail={**budget, "rows": int(rec["n"].sum()),
                       "train_fvu": [[int(m["step"]), round(m["fvu"], 4)] for m in history]}),
        Result(float(recovered_of(losses)), n=n, interval=bootstrap_interval(losses, recovered_of, **ci),
               metric="ce_loss_recovered", baselines={"zero_ablation_ce": zero, "clean_ce": clean},
               detail={**budget, "ce_spliced": float(losses[:, 2].sum() / rec["n"].sum()),
                       "positions": "every position but BOS spliced; every predicted token scored"}),
        Result.mean(per_token[:, 2] - per_token[:, 0], ctx.seed, metric="delta_loss",
                    detail={"unit": "nats per token, spliced minus clean, mean over windows"}),
        Result(float(rec["l0"].sum() / rec["n"].sum()), metric="l0", detail={"on": "held-out rows"}),
        Result(never, metric="dead_fraction",
               detail={"definition": "latents that never fired in training", "training_tokens": int(trainer.tokens),
                       "dead_on_held_out": float((~rec["fired"]).float().mean()), "pages_for": pages}),
        Result(seconds, metric="train_seconds", detail={"steps": steps, "threads": torch.get_num_threads()}),
    ]
