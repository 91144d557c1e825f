"""Attention-head scores and head ablations.

Scores read attention patterns ``[batch, n_heads, q_pos, k_pos]`` (cached at the
``attn_pattern`` alias: the zoo transformer's ``blocks.{l}.attn.pattern``, a Hugging Face
attention's returned weights under eager attention) on sequences that repeat with a known
period P:

- **previous-token**: mean attention from each query to the position just before it;
- **induction ("stripe")**: mean attention from each query in the repeat to the token
  *after* the previous occurrence of the current token (offset P − 1). This is the
  stripe score of Olsson et al.; a "mul"-style score (attention × copying) is not what
  is reported, since it saturates near 0.5 on a 2×L repeat;
- **duplicate-token**: mean attention from each query in the repeat to the previous
  occurrence of the same token (offset P).

Ablations replace one head's output (its slice of the output projection's input) by
zero or by its mean over the batch, and the ablation type is recorded with every score.
Layer and head counts, paths and widths come from the model's structure, so the same
calls run on the built-in transformer and on Hugging Face models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from mechscope.core import aliases
from mechscope.core.intervene import Mean, Zero
from mechscope.core.run import cache, call_model, logits_of, run
from mechscope.core.site import Site
from mechscope.core.structure import StructureError, structure

Ablation = Literal["zero", "mean"]


def attention_patterns(model: nn.Module, inputs: Any, n_layers: int | None = None) -> Tensor:
    """Patterns of the first ``n_layers`` layers (default: all),
    ``[n_layers, batch, n_heads, q_pos, k_pos]``."""
    s = structure(model)
    sites = [aliases.attn_pattern(model, layer) for layer in range(s.n_layers if n_layers is None else n_layers)]
    with torch.no_grad():
        acts = cache(model, inputs, sites)
    return torch.stack([acts[site] for site in sites])


def _check_pattern(patterns: Tensor) -> None:
    if patterns.dim() < 4 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(f"expected attention patterns [..., batch, n_heads, pos, pos] (square in the last two "
                         f"dims, every query over every key), got {list(patterns.shape)}")


def _diagonal_mean(patterns: Tensor, offset: int, first_query: int) -> Tensor:
    """Mean over batch and queries ``q >= first_query`` of ``pattern[q, q - offset]`` -> ``[..., n_heads]``."""
    _check_pattern(patterns)
    first_query = max(first_query, offset)
    if first_query >= patterns.shape[-1]:
        raise ValueError(f"no query at or after position {first_query} in sequences of {patterns.shape[-1]} positions")
    diag = torch.diagonal(patterns, offset=-offset, dim1=-2, dim2=-1)  # [..., batch, heads, pos - offset]; j <-> q = offset + j
    return diag[..., first_query - offset:].mean(-1).mean(-2)


def previous_token_score(patterns: Tensor) -> Tensor:  # -> [..., n_heads]
    """Mean attention to the previous position, over every query after the first."""
    return _diagonal_mean(patterns, 1, 1)


def induction_score(patterns: Tensor, period: int) -> Tensor:  # -> [..., n_heads]
    """Stripe score: mean attention to offset ``period - 1`` from the queries of the repeat
    (positions ``period + 1`` on, with BOS at 0 and the first copy at 1..period)."""
    if period < 2:
        raise ValueError(f"the induction score needs a period >= 2, got {period}")
    return _diagonal_mean(patterns, period - 1, period + 1)


def duplicate_token_score(patterns: Tensor, period: int) -> Tensor:  # -> [..., n_heads]
    """Mean attention to offset ``period`` (the same token, one period back) from the repeat's queries."""
    if period < 1:
        raise ValueError(f"the duplicate-token score needs a period >= 1, got {period}")
    return _diagonal_mean(patterns, period, period + 1)


def head_scores(model: nn.Module, tokens: Tensor, period: int, n_layers: int | None = None) -> dict[str, Tensor]:
    """All three scores per head, each ``[n_layers, n_heads]``, on repeated ``tokens``."""
    patterns = attention_patterns(model, tokens, n_layers)
    return {"previous_token": previous_token_score(patterns),
            "induction_stripe": induction_score(patterns, period),
            "duplicate_token": duplicate_token_score(patterns, period)}


# ------------------------------------------------------------------------------ ablation


def ablation_for(kind: Ablation, model: nn.Module, inputs: Any, site: Site) -> Callable:
    """A zero ablation, or a mean ablation with the head's mean over ``inputs`` (per position)."""
    if kind == "zero":
        return Zero()
    if kind == "mean":
        with torch.no_grad():
            view = cache(model, inputs, [site])[site]
        return Mean(view.mean(0))
    raise ValueError(f"unknown ablation {kind!r}; use 'zero' or 'mean'")


@dataclass(frozen=True)
class SweepResult:
    """Metric with each head ablated: ``values[layer, head]``, and the unablated metric."""

    values: Tensor  # [n_layers, n_heads]
    baseline: float
    ablation: str
    metric: str

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "baseline": self.baseline,
                "ablation": self.ablation, "metric": self.metric}


def head_ablation_sweep(model: nn.Module, inputs: Any, metric: Callable[[Any], Tensor], ablation: Ablation = "mean",
                        metric_name: str = "metric", n_layers: int | None = None) -> SweepResult:
    """The metric of the logits with each head of the first ``n_layers`` layers (default:
    all) ablated in turn (one forward per head)."""
    s = structure(model)
    if not s.n_heads:
        raise StructureError(f"the number of heads of {s.model_class} is unknown; pass structure(model, n_heads=..., head_dim=...)")
    n_layers = s.n_layers if n_layers is None else n_layers
    values = torch.empty(n_layers, s.n_heads)
    with torch.no_grad():
        base = float(metric(logits_of(call_model(model, inputs))))
        for layer in range(n_layers):
            for head in range(s.n_heads):
                site = aliases.head_out(s, layer, head)
                out, _ = run(model, inputs, {site: ablation_for(ablation, model, inputs, site)})
                values[layer, head] = float(metric(logits_of(out)))
    return SweepResult(values, base, ablation, metric_name)
