"""The forwards of an SPD step, all through the core's hooks on the unmodified model.

- :func:`target_pass`: one no-grad forward of the target that caches the input of every
  decomposed layer (the "pre-weight activations") and returns the target's output.
- :func:`masked_forward`: a forward in which chosen layers compute with their
  subcomponents under masks (``U (m ⊙ V a) + bias``), the others with the target weights.
- :func:`batched_masked_passes`: the stochastic forward (all layers masked) *and* the L
  layerwise forwards (one layer masked each) as **one** forward of L + 1 stacked copies
  of the batch. In layerwise copy ``l`` every layer before ``l`` runs the target weights,
  so layer ``l``'s input is the target's: its inner activations ``V a`` are the ones
  already computed for the importance functions, and its output is precomputed.
- :func:`sequential_masked_passes`: the straightforward version (L + 1 separate forwards,
  inner activations recomputed in every one), kept as the reference the batched version
  is tested and benchmarked against.

Every pass replaces a layer's output through an output-site intervention that reads the
module's input from the hook call (``HookCall.args``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mechscope.core.run import HookCall, run
from mechscope.core.site import Site
from mechscope.spd.components import SPDError
from mechscope.spd.decomposition import Decomposition


def model_output(out: Any) -> Tensor:
    """The tensor to reconstruct from a model's output: a tensor, ``.logits``, or element 0."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise SPDError(f"cannot find the output tensor of a {type(out).__name__}; SPD reconstructs a tensor "
                   "output, a .logits attribute, or the first element of a tuple")


def batch_size_of(inputs: Any) -> int:
    """Examples in a batch of model inputs (dim 0 of its first tensor)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values:
        if isinstance(v, Tensor):
            return int(v.shape[0])
    raise SPDError(f"cannot find a batch tensor in inputs of type {type(inputs).__name__}")


def repeat_inputs(inputs: Any, n: int) -> Any:
    """``n`` stacked copies of a batch along dim 0 (tensor, tuple or dict of tensors)."""
    if n == 1:
        return inputs
    rep = lambda v: v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() else v  # noqa: E731
    if isinstance(inputs, Tensor):
        return rep(inputs)
    if isinstance(inputs, Mapping):
        return {k: rep(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(rep(v) for v in inputs)
    raise SPDError(f"cannot stack inputs of type {type(inputs).__name__}; give a tensor, a tuple or a dict")


def check_finite_output(y: Tensor, what: str = "the target model's output") -> None:
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        n_nan, n_inf = int(torch.isnan(y).sum()), int(torch.isinf(y).sum())
        raise SPDError(f"{what} has {n_nan} NaN and {n_inf} inf value(s) on this batch; SPD needs a finite "
                       "target to reconstruct. Check the model's weights (a diverged checkpoint?) and the inputs")


def target_pass(model: torch.nn.Module, dec: Decomposition, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Target output and the input of every decomposed layer, with no gradient."""
    sites = {path: Site(path, io="input") for path in dec.paths}
    with torch.no_grad():
        out, acts = run(model, inputs, cache=list(sites.values()), check_finite=False)
    y = model_output(out)
    check_finite_output(y)
    return y, {path: acts[site] for path, site in sites.items()}


class _Replace:
    """Output intervention: recompute the layer from its input with its subcomponents.

    ``rows`` limits the replacement to the first ``rows`` examples of the (stacked)
    batch; ``extra(view)`` may splice precomputed rows after them.
    """

    def __init__(self, dec: Decomposition, path: str, mask: Tensor | None, delta: Tensor | None,
                 rows: int | None = None, extra: Callable[[Tensor], list[Tensor]] | None = None) -> None:
        self.dec, self.path, self.mask, self.delta, self.rows, self.extra = dec, path, mask, delta, rows, extra
        self.calls = 0

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise SPDError(f"module {self.path!r} ran more than once in one forward; SPD decomposes a layer "
                           "that is used once per forward (decompose each use as its own module)")
        if not call.args or not isinstance(call.args[0], Tensor):
            raise SPDError(f"module {self.path!r} was not called with its input as the first positional argument")
        a = call.args[0]
        if self.rows is None:
            return self.dec.layer_output(self.path, a, self.mask, self.delta).to(view.dtype)
        new = self.dec.layer_output(self.path, a[:self.rows], self.mask, self.delta).to(view.dtype)
        return torch.cat([new, *self.extra(view)]) if self.extra else torch.cat([new, view[self.rows:]])


def masked_forward(model: torch.nn.Module, dec: Decomposition, inputs: Any, masks: Mapping[str, Tensor | None],
                   deltas: Mapping[str, Tensor | None] | None = None) -> Tensor:
    """Output with the layers in ``masks`` computed by their masked subcomponents.

    ``masks[path]`` is ``[batch, (pos,) C]`` (None: all subcomponents unmasked); layers not
    in ``masks`` keep the target weights. ``deltas[path]`` scales the delta component.
    """
    deltas = deltas or {}
    plan = [(Site(p), _Replace(dec, p, m, deltas.get(p))) for p, m in masks.items()]
    out, _ = run(model, inputs, plan, check_finite=False)
    return model_output(out)


def sequential_masked_passes(model: torch.nn.Module, dec: Decomposition, inputs: Any,
                             masks: Mapping[str, Tensor], deltas: Mapping[str, Tensor | None],
                             layerwise: bool = True) -> list[Tensor]:
    """Straightforward: the stochastic forward, then one forward per layer (layerwise)."""
    outs = [masked_forward(model, dec, inputs, masks, deltas)]
    if layerwise:
        outs += [masked_forward(model, dec, inputs, {p: masks[p]}, {p: deltas.get(p)}) for p in dec.paths]
    return outs


def batched_masked_passes(model: torch.nn.Module, dec: Decomposition, inputs: Any, acts: Mapping[str, Tensor],
                          inner: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                          deltas: Mapping[str, Tensor | None], layerwise: bool = True) -> list[Tensor]:
    """The same outputs as :func:`sequential_masked_passes`, from one forward of stacked copies.

    Copy 0 is the stochastic forward; copy ``l + 1`` is layer ``l``'s layerwise forward,
    whose output at layer ``l`` is precomputed from the target's input ``acts`` and inner
    activations ``inner`` (so ``V a`` is never recomputed there).
    """
    b = batch_size_of(inputs)
    paths = dec.paths
    n = 1 + (len(paths) if layerwise else 0)
    plan = []
    for l, path in enumerate(paths):
        extra = None
        if layerwise:
            mine = dec.layer_output(path, acts[path], masks[path], deltas.get(path), inner=inner[path])

            def extra(view: Tensor, l: int = l, mine: Tensor = mine) -> list[Tensor]:
                # copies 1..l and l+2..n keep the target weights here; copy l+1 is precomputed
                return [view[b:(l + 1) * b], mine.to(view.dtype), view[(l + 2) * b:]]
        plan.append((Site(path), _Replace(dec, path, masks[path], deltas.get(path), rows=b, extra=extra)))
    out, _ = run(model, repeat_inputs(inputs, n), plan, check_finite=False)
    y = model_output(out)
    return list(y.split(b))
