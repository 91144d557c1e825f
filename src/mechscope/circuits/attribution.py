"""Attribution patching: a first-order estimate of every cell's patching effect at once.

``ΔM ≈ (a_source − a_base) · ∂M/∂a |_base`` for every cell, from one forward on the
source input (its activations), one forward on the base input and one backward (the
gradients at every site), whatever the number of cells (Nanda 2023; Syed et al. 2023).

- ``direction="noise"`` (the default, as in the spec): the base is the clean run and the
  source the corrupt one; the estimate says how much patching the corrupt activation in
  would move the metric.
- ``direction="denoise"``: the base is the corrupt run, the source the clean one.

The result is a :class:`~mechscope.circuits.patching.PatchResult` whose ``values`` are the
*estimated* patched metrics ``M_base + ΔM``, so its normalised scores and effects read
exactly like activation patching's, and its ablation says it is an estimate.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mechscope.circuits.patching import (Cell, Direction, Metric, PatchResult, _check_pair, _positions_ok,
                                         ablation_name, model_output, normalised_score)
from mechscope.core.run import HookCall, run


class GradCapture:
    """An intervention that leaves the activation unchanged and keeps it, in the graph, for
    its gradient. An activation that does not yet require grad (the model's weights are
    frozen, its inputs integers) becomes a leaf that does: later sites then depend on it."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        if not view.requires_grad:
            view = view.detach().requires_grad_(True)
        self.value = view
        return view


def site_gradients(model: nn.Module, inputs: Any, sites: Sequence[Any], metric: Metric) -> tuple[float, dict, dict]:
    """One forward and one backward: the metric, each site's activation and ∂metric/∂activation."""
    captures = {s: GradCapture() for s in sites}
    # weights need no gradient: with them frozen the graph holds only the activations' paths
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _forward_backward(model, inputs, captures, metric)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _forward_backward(model: nn.Module, inputs: Any, captures: dict, metric: Metric) -> tuple[float, dict, dict]:
    with torch.enable_grad():
        out, _ = run(model, inputs, captures)
        m = metric(model_output(out))
        if not isinstance(m, Tensor) or m.numel() != 1 or not m.requires_grad:
            raise ValueError("attribution patching needs a differentiable scalar metric of the model's output "
                             "(a tensor built from the logits, mean over the batch)")
        missing = [str(s) for s, c in captures.items() if c.value is None]
        if missing:
            raise ValueError(f"sites {missing} were never reached by the forward pass")
        grads = torch.autograd.grad(m, [c.value for c in captures.values()], allow_unused=True)
    acts = {s: c.value.detach() for s, c in captures.items()}
    grads = {s: (g if g is not None else torch.zeros_like(acts[s])) for s, g in zip(captures, grads)}
    return float(m.detach()), acts, grads


def attribution_patching(model: nn.Module, clean: Any, corrupt: Any, cells: Sequence[Cell], metric: Metric,
                         direction: Direction = "noise") -> PatchResult:
    """Estimated patching effect of every cell (see the module docstring)."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if not cells:
        raise ValueError("attribution_patching needs at least one cell")
    _check_pair(clean, corrupt)
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    sites = list(dict.fromkeys(c.site for c in cells))
    with torch.no_grad():  # one forward on the source: its output and its activations
        out, src = run(model, source, cache=sites)
        m_source = float(metric(model_output(out)))
    m_base, acts, grads = site_gradients(model, base, sites, metric)
    _positions_ok(cells, acts)
    # (a_source − a_base) · ∂M/∂a, summed over everything but batch and position, per site
    contrib = {}
    for site in sites:
        d = (src[site] - acts[site]) * grads[site]  # [batch, pos, ...] or [batch, ...]
        contrib[site] = d.flatten(2).sum(-1).double() if d.dim() >= 3 else d.flatten(1).sum(-1, keepdim=True).double()
    values = torch.empty(len(cells), dtype=torch.float64)
    for i, c in enumerate(cells):
        part = contrib[c.site] if c.position is None else contrib[c.site][:, c.position]
        values[i] = m_base + float(part.sum())
    m_clean, m_corrupt = (m_base, m_source) if direction == "noise" else (m_source, m_base)
    normalised_score(torch.zeros(1), m_clean, m_corrupt)  # refuse inputs no estimate can be scored on
    return PatchResult(list(cells), values, m_clean, m_corrupt, direction,
                       "attribution estimate of " + ablation_name(direction),
                       {"method": "attribution_patching"})
