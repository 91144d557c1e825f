"""Attribution patching: a first-order estimate of every cell's patching effect at once.

``ΔM ≈ (a_source − a_base) · ∂M/∂a |_base`` for every cell, from one forward on the
source input (its activations), one forward on the base input and one backward (the
gradients at every site), whatever the number of cells (Nanda 2023; Syed et al. 2023).

- ``direction="noise"`` (the default, as in the spec): the base is the clean run and the
  source the corrupt one; the estimate says how much patching the corrupt activation in
  would move the metric.
- ``direction="denoise"``: the base is the corrupt run, the source the clean one.

Cost: no weight gradients are computed (``autograd.grad`` with the captured activations
as its only inputs); with a ``readout`` (the positions the metric reads) the base run
stops at the stream the metric depends on and runs the rest at those positions only
(:mod:`mechscope.circuits.readout`), so neither the unembedding of every position nor
its backward is paid for.

The result is a :class:`~mechscope.circuits.patching.PatchResult` whose ``values`` are the
*estimated* patched metrics ``M_base + ΔM``, so its normalised scores and effects read
exactly like activation patching's, and its ablation says it is an estimate.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mechscope.circuits.patching import (Cell, Direction, Metric, PatchResult, ablation_name, base_and_source,
                                         by_site, check_positions, normalised_score)
from mechscope.circuits.readout import Head, find_head, read_positions
from mechscope.core.run import HookCall, NonFiniteActivationError, logits_of, run
from mechscope.core.suffix import keep_read, metric_view


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


def site_gradients(model: nn.Module, inputs: Any, sites: Sequence[Any], metric: Metric,
                   readout: Sequence[int] | None = None, head: Head | None = None) -> tuple[float, dict, dict]:
    """One forward and one backward: the metric, each site's activation and ∂metric/∂activation.

    ``readout``: the positions whose logits the metric reads (it gets [batch, len(readout),
    vocab]); with a ``head`` (:func:`~mechscope.circuits.readout.find_head`, checked) the
    forward stops after the last block and the head runs at those positions only.
    """
    captures = {s: GradCapture() for s in sites}
    # no weight gradients: autograd.grad computes only what the captured activations need
    return _forward_backward(model, inputs, captures, metric, readout, head)


def _forward_backward(model: nn.Module, inputs: Any, captures: dict, metric: Metric,
                      readout: Sequence[int] | None, head: Head | None) -> tuple[float, dict, dict]:
    with torch.enable_grad():
        if head is not None and readout is not None:  # the stream after the last block, then the head where read
            _, kept = run(model, inputs, captures, cache=[head.anchor], detach=False, stop_when_cached=True,
                          check_finite=False)
            m = metric(head(kept[head.anchor], readout, inputs))
        else:
            out, _ = run(model, inputs, captures, check_finite=False)
            m = metric(read_positions(logits_of(out), readout))
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
                         direction: Direction = "noise", readout: Sequence[int] | None = None) -> PatchResult:
    """Estimated patching effect of every cell (see the module docstring).

    ``readout``: the positions whose logits the metric reads (it then gets ``[batch,
    len(readout), vocab]``); the base run's final norm and unembedding then run there only,
    forward and backward, where the model's own logits confirm that this is what it does.
    """
    base, source, sites = base_and_source(clean, corrupt, direction, cells, "attribution_patching")
    head = find_head(model, sites) if readout is not None else None
    with torch.no_grad():  # one forward on the source: its output, its activations, and a check of the head
        src_in, done = keep_read(model, source, readout)  # logits_to_keep: the unembedding at the readout only
        out, src = run(model, src_in, cache=list(dict.fromkeys(sites + ([head.anchor] if head else []))),
                       check_finite=False)  # the estimates are checked at the end
        logits = metric_view(out, readout, done)
        m_source = float(metric(logits))
        if head is not None and not head.reproduces(src[head.anchor], readout, source, logits):
            head = None
    m_base, acts, grads = site_gradients(model, base, sites, metric, readout, head)
    check_positions(cells, acts)
    values = [0.0] * len(cells)
    for site, mine in by_site(cells).items():
        # (a_source − a_base) · ∂M/∂a, summed over everything but position (and over the batch)
        d = (src[site] - acts[site]) * grads[site]  # [batch, pos, ...] or [batch, ...]
        rows = d.flatten(2).sum(-1).double() if d.dim() >= 3 else d.flatten(1).sum(-1, keepdim=True).double()
        per_pos, whole = rows.sum(0), float(rows.sum())  # [pos], the whole site
        at = [cells[i].position for i in mine if cells[i].position is not None]
        parts = iter(per_pos[at].tolist()) if at else iter(())
        for i in mine:
            values[i] = m_base + (whole if cells[i].position is None else next(parts))
    values = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):  # checked once here rather than at every site of both runs
        raise NonFiniteActivationError(
            f"attribution patching gave {int((~torch.isfinite(values)).sum())} non-finite estimate(s): a NaN or inf "
            "in the activations or gradients at the sites; check the inputs and the model's weights "
            "(mechscope.core.run.run(model, inputs, cache=sites) names the first site that has one)")
    m_clean, m_corrupt = (m_base, m_source) if direction == "noise" else (m_source, m_base)
    normalised_score(torch.zeros(1), m_clean, m_corrupt)  # refuse inputs no estimate can be scored on
    return PatchResult(list(cells), values, m_clean, m_corrupt, direction,
                       "attribution estimate of " + ablation_name(direction),
                       {"method": "attribution_patching"})
