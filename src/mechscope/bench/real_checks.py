"""The real-model suite (``mechscope bench --suite real``): issue 20's rows on the reference
real model, Gemma-3-270M (``pip install 'mechscope[real]'``; never part of CI's tests).

This module holds the structure check (issue 20, row 7) and imports the modules of the
other rows so that the catalog's one entry registers them all:

- :mod:`mechscope.bench.real_induction`: induction heads on random tokens repeated once.
- :mod:`mechscope.bench.real_steering`: steering by difference of means against prompting (row 4).
- :mod:`mechscope.bench.real_probes`: token-property probes with control tasks (row 5).
- :mod:`mechscope.bench.real_sae`: a TopK SAE on the residual stream, from a cached store (row 3).
- :mod:`mechscope.bench.real_das`: DAS localising which IOI name repeats (row 6).

Every threshold is written in the registry with its source before the row first ran,
with its budget in the row's detail; a finding that is not reproduced stays so. The model
is loaded once per run (:mod:`mechscope.bench.real_model`) and its record (weights
SHA-256, library versions, dtype) goes into the scoreboard.
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.bench import (
    Criterion,
    Result,
    check,
    real_das,  # noqa: F401 - registers the DAS-on-IOI rows
    real_induction,  # noqa: F401 - registers the induction rows
    real_ioi,  # noqa: F401 - registers the indirect-object identification rows
    real_probes,  # noqa: F401 - registers the probe rows
    real_sae,  # noqa: F401 - registers the SAE-on-the-residual-stream rows
    real_steering,  # noqa: F401 - registers the steering-vs-prompting rows
)
from mechscope.bench.real_model import REFERENCE, reference_model
from mechscope.core.aliases import attn_out, mlp_out, resid_post, resid_pre
from mechscope.core.run import cache
from mechscope.core.structure import structure
from mechscope.core.text import text_batch

ISSUE7 = "issue 20, row 7 (structure invariants on the real model)"
TEXTS = ["The capital of France is Paris, and the capital of Germany is",
         "Once upon a time there was a little girl who lived in a small house near the woods.",
         "def add(a, b):\n    return a + b"]


def _write_errors(model: Any, batch: dict[str, torch.Tensor]) -> tuple[list[float], list[float], dict]:
    """Per layer: ||update - (attn write + mlp write)|| / ||update|| over the real tokens, and the
    largest such ratio at one position; with the cached activations."""
    s = structure(model)
    sites = [f(model, layer) for layer in range(s.n_layers) for f in (resid_pre, resid_post, attn_out, mlp_out)]
    with torch.no_grad():
        acts = cache(model, batch, sites, stop_when_cached=False)
    keep = batch["attention_mask"].bool().to(acts[sites[0]].device)  # pads are not the model's tokens
    whole, worst = [], []
    for layer in range(s.n_layers):
        update = (acts[resid_post(model, layer)] - acts[resid_pre(model, layer)]).double()[keep]  # [tokens, d]
        writes = (acts[attn_out(model, layer)] + acts[mlp_out(model, layer)]).double()[keep]
        gap = update - writes
        whole.append(float(gap.norm() / update.norm()))
        worst.append(float((gap.norm(dim=-1) / update.norm(dim=-1).clamp_min(1e-30)).max()))
    return whole, worst, acts


def _plain_hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A plain forward's stream after every block: Hugging Face's hidden states 1..n-1, and for
    the last block the final norm's input (its last hidden state is taken after the norm),
    caught by a bare forward pre-hook rather than mechscope's own machinery."""
    s = structure(model)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(s.final_norm).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the final norm {s.final_norm!r} ran {len(seen)} times in one forward, not once")
    return [*out.hidden_states[1:s.n_layers], seen[0]]


@check("real_structure", "writes_and_cache", "max_write_relative_error", threshold=("<=", 1e-4), kind="check",
       source=ISSUE7 + ": residual writes sum to the residual update at every layer", suite="real",
       other_metrics={"cache_mismatched_layers": Criterion.check(
           "==", 0, source=ISSUE7 + ": cached block outputs equal a plain forward's hidden states bit for bit (the "
           "last block's against the final norm's input)"), "max_position_relative_error": None},
       description="Gemma-3-270M: attn_out + mlp_out (the post-normed writes) equal resid_post - resid_pre at "
                   "every layer, and cached block outputs equal a plain forward's hidden states bit for bit")
def structure_invariants(ctx) -> list[Result]:
    model, tok = reference_model(ctx)
    batch = {k: v.to(ctx.device) for k, v in text_batch(TEXTS, tok).items()}
    whole, worst, acts = _write_errors(model, batch)
    plain = _plain_hidden_states(model, batch)
    n = len(plain)
    mismatched = [layer for layer in range(n) if not torch.equal(acts[resid_post(model, layer)], plain[layer])]
    diffs = {layer: float((acts[resid_post(model, layer)] - plain[layer]).abs().max()) for layer in mismatched}
    detail = {"model": REFERENCE, "texts": len(TEXTS), "tokens": int(batch["attention_mask"].sum()),
              "attention": getattr(model.config, "_attn_implementation", None)}
    return [
        Result(max(whole), detail={**detail, "per_layer": whole, "over": "every real (unpadded) token, per layer"}),
        Result(float(len(mismatched)), detail={**detail, "layers": n, "mismatched": mismatched,
                                               "max_abs_difference": diffs,
                                               "compared": "resid_post.l (cached, hooks on) against hidden_states"
                                                           "[l + 1] of a plain forward; the last block against "
                                                           "the final norm's input; torch.equal (bit for bit)"},
               metric="cache_mismatched_layers"),
        Result(max(worst), detail={**detail, "per_layer": worst,
                                   "note": "the largest ratio at a single token; no criterion (a token whose update "
                                           "is tiny has a large ratio from float32 rounding alone)"},
               metric="max_position_relative_error"),
    ]
