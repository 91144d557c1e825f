"""The forwards of an SPD step, all through the core's hooks on the unmodified model.

- :func:`target_pass`: one no-grad forward of the target that caches the input of every
  decomposed layer (the "pre-weight activations") and returns the target's output.
- :func:`masked_forward`: a forward in which chosen layers compute with their
  subcomponents under masks (``U (m ⊙ V a) + bias``), the others with the target weights.
- :func:`batched_masked_passes`: the stochastic forward (all layers masked) *and* the L
  layerwise forwards (one layer masked each) as **one** forward of L + 1 stacked copies
  of the batch. In layerwise copy ``l`` every layer before ``l`` runs the target weights,
  so layer ``l``'s input is the target's: its inner activations ``V a`` are the ones
  already computed for the importance functions; the delta component ``δ (W − UV) a``
  reuses the module's own output ``W a + b`` instead of a second matmul.
- :func:`sequential_masked_passes`: the straightforward version (L + 1 separate forwards,
  inner activations and the delta matmul recomputed in every one), kept as the reference
  the batched version is tested and benchmarked against.

Every pass replaces a layer's output through an output-site intervention that reads the
module's input from the hook call (``HookCall.args``).
"""

from __future__ import annotations

from typing import Any, Mapping

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
    """Output intervention: recompute the layer from its input with its subcomponents,
    ``U (m ⊙ V a) + b + δ (W − U V) a``, everything computed explicitly."""

    def __init__(self, dec: Decomposition, path: str, mask: Tensor | None, delta: Tensor | None) -> None:
        self.dec, self.path, self.mask, self.delta = dec, path, mask, delta
        self.calls = 0

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise SPDError(f"module {self.path!r} ran more than once in one forward; SPD decomposes a layer "
                           "that is used once per forward (decompose each use as its own module)")
        if not call.args or not isinstance(call.args[0], Tensor):
            raise SPDError(f"module {self.path!r} was not called with its input as the first positional argument")
        return self.dec.layer_output(self.path, call.args[0], self.mask, self.delta).to(view.dtype)


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


class _Batched:
    """Output intervention of the batched passes at one layer, for ``n`` stacked copies of ``b`` rows.

    Copy 0 (stochastic): the subcomponents on this copy's own input; its inner activations
    are the target's ones when the input is the target's (a layer no replaced layer feeds).
    Copy ``l + 1`` (this layer's layerwise copy): its input is the target's, so its inner
    activations are the ones already computed. The delta component uses the module's own
    output ``W a + b`` on the same rows. Other copies keep the module's output.
    """

    def __init__(self, dec: Decomposition, path: str, l: int | None, b: int, act: Tensor, inner: Tensor,
                 mask: Tensor, delta: Tensor | None) -> None:
        self.dec, self.path, self.l, self.b, self.act, self.inner = dec, path, l, b, act, inner
        self.mask, self.delta, self.calls = mask, delta, 0

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise SPDError(f"module {self.path!r} ran more than once in one forward; SPD decomposes a layer "
                           "that is used once per forward (decompose each use as its own module)")
        dec, b, total = self.dec, self.b, view.shape[0]
        # split (not slicing): its backward is one concatenation, where every slice of a
        # large activation would allocate and zero a full-size gradient
        a0 = call.args[0].split([b, total - b])[0]
        same = not a0.requires_grad and a0.shape == self.act.shape and torch.equal(a0, self.act)
        h0 = self.inner if same else dec.comps(self.path).inner(a0)
        if self.l is None:
            first, rest = view.split([b, total - b])
            return torch.cat([dec.layer_output_from_target(self.path, h0, self.mask, self.delta, first), rest])
        lo, hi = (self.l + 1) * b, (self.l + 2) * b
        first, before, own, after = view.split([b, lo - b, b, total - hi])
        new = dec.layer_output_from_target(self.path, h0, self.mask, self.delta, first)
        mine = dec.layer_output_from_target(self.path, self.inner, self.mask, self.delta, own)
        return torch.cat([new, before, mine, after]).to(view.dtype)


def batched_masked_passes(model: torch.nn.Module, dec: Decomposition, inputs: Any, acts: Mapping[str, Tensor],
                          inner: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                          deltas: Mapping[str, Tensor | None], layerwise: bool = True) -> list[Tensor]:
    """The same outputs as :func:`sequential_masked_passes`, from one forward of stacked copies.

    Copy 0 is the stochastic forward; copy ``l + 1`` is layer ``l``'s layerwise forward.
    The target's layer inputs ``acts`` and inner activations ``inner`` are reused wherever a
    copy's input at a layer is the target's, so ``V a`` is never recomputed there.
    """
    b = batch_size_of(inputs)
    n = 1 + (len(dec.paths) if layerwise else 0)
    plan = [(Site(path), _Batched(dec, path, l if layerwise else None, b, acts[path], inner[path], masks[path],
                                  deltas.get(path)))
            for l, path in enumerate(dec.paths)]
    out, _ = run(model, repeat_inputs(inputs, n), plan, check_finite=False)
    y = model_output(out)
    return list(y.split(b))
