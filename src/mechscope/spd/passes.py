"""The forwards of an SPD step, on the unmodified model.

- :func:`target_pass`: one no-grad forward of the target that caches the input of every
  decomposed layer (the "pre-weight activations") and returns the target's output;
  :func:`target_pass_keeping` also keeps the outputs the batched passes can reuse.
- :func:`masked_forward`: a forward in which chosen layers compute with their
  subcomponents under masks (``U (m ⊙ V a) + bias``), the others with the target weights.
- :func:`batched_masked_passes`: the stochastic forward (all layers masked) *and* the L
  layerwise forwards (one layer masked each) as **one** forward of L + 1 stacked copies
  of the batch. In layerwise copy ``l`` every layer before ``l`` runs the target weights,
  so layer ``l``'s input is the target's: its inner activations ``V a`` are the ones
  already computed for the importance functions; the delta component ``δ (W − UV) a``
  reuses the layer's own output ``W a + b`` instead of a second matmul, and that output
  is the target's wherever the input is (:mod:`.reuse`); the frozen modules before the
  first decomposed layer do not run at all.
- :func:`sequential_masked_passes`: the straightforward version (L + 1 separate forwards,
  inner activations and the delta matmul recomputed in every one), kept as the reference
  the batched version is tested and benchmarked against.

``masked_forward`` replaces a layer's output through an output-site intervention that
reads the module's input from the hook call (``HookCall.args``). The batched passes
*substitute* the layers instead (:mod:`mechscope.core.substitute`): a hook would let each
layer compute ``W a + b`` on every copy first, most of it thrown away.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor

from mechscope.core.recording import repeated
from mechscope.core.replay import output_logits
from mechscope.core.run import HookCall, call_model, run
from mechscope.core.site import Site
from mechscope.core.substitute import substituting
from mechscope.spd.components import SPDError
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.reuse import reuse_plan, settle_prefix


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
    y, acts, _ = target_pass_keeping(model, dec, inputs, keep=False)
    return y, acts


def target_pass_keeping(model: torch.nn.Module, dec: Decomposition, inputs: Any, keep: bool = True,
                        ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """:func:`target_pass`, also keeping (``keep``) the outputs the batched passes can reuse:
    every decomposed layer's and every frozen-prefix module's (:mod:`.reuse`)."""
    sites = {path: Site(path, io="input") for path in dec.paths}
    outs = {}
    if keep:
        plan = reuse_plan(model, dec.paths, inputs, batch_size_of(inputs), dec)
        outs = {path: Site(path) for path in (*dec.paths, *plan.prefix)}
    with torch.no_grad():
        out, acts = run(model, inputs, cache=[*sites.values(), *outs.values()], check_finite=False)
    y = output_logits(out)
    check_finite_output(y)
    return y, {path: acts[site] for path, site in sites.items()}, {path: acts[site] for path, site in outs.items()}


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
    return output_logits(out)


def sequential_masked_passes(model: torch.nn.Module, dec: Decomposition, inputs: Any,
                             masks: Mapping[str, Tensor], deltas: Mapping[str, Tensor | None],
                             layerwise: bool = True) -> list[Tensor]:
    """Straightforward: the stochastic forward, then one forward per layer (layerwise)."""
    outs = [masked_forward(model, dec, inputs, masks, deltas)]
    if layerwise:
        outs += [masked_forward(model, dec, inputs, {p: masks[p]}, {p: deltas.get(p)}) for p in dec.paths]
    return outs


class _BatchedLayer:
    """Substitute for one decomposed layer in the batched passes: ``n`` stacked copies of ``b`` rows.

    Copy 0 (stochastic) and this layer's own layerwise copy compute with the masked
    subcomponents; the other copies keep ``W a + b``. Where a copy's input is still the
    target's (``unchanged``), ``V a`` is the inner activation already computed and
    ``W a + b`` the target's own output (``known``), so neither is recomputed; the module
    itself runs only on the rows of kept (or delta) copies whose input has changed.
    """

    def __init__(self, dec: Decomposition, path: str, own: int | None, b: int, unchanged: list[bool],
                 inner: Tensor, known: Tensor | None, mask: Tensor, delta: Tensor | None) -> None:
        self.dec, self.path, self.own, self.b, self.unchanged = dec, path, own, b, unchanged
        self.inner, self.known, self.mask, self.delta, self.calls = inner, known, mask, delta, 0

    def __call__(self, original: Any, a: Tensor, *rest: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise SPDError(f"module {self.path!r} ran more than once in one forward; SPD decomposes a layer "
                           "that is used once per forward (decompose each use as its own module)")
        if rest or kwargs or not isinstance(a, Tensor):
            raise SPDError(f"module {self.path!r} was not called with its input as its only argument")
        dec, outs = self.dec, []
        # split (not slicing): its backward is one concatenation, where every slice of a
        # large activation would allocate and zero a full-size gradient
        for c, piece in enumerate(a.split(self.b)):
            same = self.unchanged[c]
            if c == 0 or c == self.own:
                h = self.inner if same else dec.comps(self.path).inner(piece)
                if self.delta is None:
                    outs.append(dec.layer_output(self.path, piece, self.mask, None, inner=h))
                else:
                    own = self._module_output(original, piece, same)
                    outs.append(dec.layer_output_from_target(self.path, h, self.mask, self.delta, own))
            else:
                outs.append(self._module_output(original, piece, same))
        # the dtype the module itself gives in this precision (its target output's: bf16 for a linear
        # layer under autocast, so that no float32 copy of the stacked output is made there)
        dtype = self.known.dtype if self.known is not None else dec.target_weight(self.path).dtype
        return torch.cat([o.to(dtype) for o in outs])

    def _module_output(self, original: Any, piece: Tensor, same: bool) -> Tensor:
        """``W a + b`` on one copy: the target's when the copy's input is, else computed."""
        return self.known if same and self.known is not None else original(piece)


def batched_masked_passes(model: torch.nn.Module, dec: Decomposition, inputs: Any, acts: Mapping[str, Tensor],
                          inner: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                          deltas: Mapping[str, Tensor | None], layerwise: bool = True,
                          known: Mapping[str, Tensor] | None = None) -> list[Tensor]:
    """The same outputs as :func:`sequential_masked_passes`, from one forward of stacked copies.

    Copy 0 is the stochastic forward; copy ``l + 1`` is layer ``l``'s layerwise forward.
    The target's layer inputs ``acts`` and inner activations ``inner`` are reused wherever a
    copy's input at a layer is the target's, so ``V a`` is never recomputed there; with
    ``known`` (from :func:`target_pass` ``(keep=True)``) the frozen prefix and the layers'
    own outputs on unchanged rows are taken from the target forward too (:mod:`.reuse`).
    """
    b = batch_size_of(inputs)
    n = 1 + (len(dec.paths) if layerwise else 0)
    plan = reuse_plan(model, dec.paths, inputs, b, dec)

    def forward(prefix: tuple[str, ...]) -> Tensor:
        subs: dict[str, Any] = repeated({p: known[p] for p in prefix}, n)  # the prefix does not run
        for l, path in enumerate(dec.paths):
            subs[path] = _BatchedLayer(dec, path, l + 1 if layerwise else None, b,
                                       plan.unchanged(path, dec.paths, layerwise), inner[path],
                                       None if known is None else known.get(path), masks[path], deltas.get(path))
        with substituting(model, subs):
            return output_logits(call_model(model, repeat_inputs(inputs, n)))

    prefix = plan.prefix if known is not None and all(p in known for p in plan.prefix) else ()
    if prefix and not plan.checked:
        prefix = _checked(dec, prefix, forward)
    return list(forward(prefix).split(b))


def _checked(dec: Decomposition, prefix: tuple[str, ...], forward: Any) -> tuple[str, ...]:
    """First use: outputs with the prefix taken from the target forward must match a full forward's."""
    with torch.no_grad():
        want = forward(())
        try:
            got = forward(prefix)
            ok = got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))
        except Exception:  # noqa: BLE001 - any failure means the prefix is not what the probe took it for
            ok = False
    settle_prefix(dec, ok)
    if ok:
        return prefix
    warnings.warn(f"SPD: taking {list(prefix)} from the target forward did not reproduce the model's output; "
                  "the batched passes run them in every step instead", RuntimeWarning, stacklevel=3)
    return ()
