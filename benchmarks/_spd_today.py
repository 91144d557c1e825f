"""Today's SPD step, frozen (2026-12-06): the in-run reference of ``bench_spd.py``.

A copy of what ``SPDObjective`` (with ``batched_passes=True``, the fused importance MLP and
the fused mask function) computed per step before the bf16 option and the speed work of
issue 22, so that every later change to ``mechscope.spd`` is measured against the same
step. It reads the parameters of a :class:`mechscope.spd.decomposition.Decomposition`
but none of its step code: do not edit it to follow the library.

``today_step(s)`` runs one training step of a bench setup (see ``bench_spd._setup``).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from mechscope.core.recording import repeated
from mechscope.core.replay import output_logits
from mechscope.core.run import call_model, run
from mechscope.core.site import Site
from mechscope.core.substitute import substituting
from mechscope.spd.components import SPDError
from mechscope.spd.reuse import reuse_plan, settle_prefix

EPS, ALIVE_CI = 1e-12, 0.1


# ------------------------------------------------------------------ the importance MLP (copied)
class _Buffers:
    """Two ``[C, H, N]`` work tensors a module reuses across steps (pre-activations, GELU).

    A forward takes them for its backward (``busy``) and the backward gives them back. A
    second forward before that backward (two graphs alive at once) gets fresh tensors, so
    that no graph's saved values are ever overwritten; autograd's version counters would
    refuse such a backward anyway.
    """

    def __init__(self) -> None:
        self.pair: tuple[Tensor, Tensor] | None = None
        self.busy = False

    def take(self, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
        if self.busy:
            return torch.empty(shape, dtype=like.dtype, device=like.device), torch.empty(
                shape, dtype=like.dtype, device=like.device)
        pair = self.pair
        if pair is None or pair[0].shape != shape or pair[0].dtype != like.dtype or pair[0].device != like.device:
            pair = self.pair = tuple(torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(2))
        self.busy = True
        return pair

    def give_back(self, t: Tensor) -> None:
        if self.pair is not None and t is self.pair[0]:
            self.busy = False


def _pre_activations(hT: Tensor, w_in: Tensor, b_in: Tensor, out: Tensor) -> Tensor:  # [C, N] -> [C, H, N]
    """``w_in[c, k] h[n, c] + b_in[c, k]`` with the batch innermost, written into ``out``."""
    return torch.mul(w_in[:, :, None], hT[:, None, :], out=out).add_(b_in[:, :, None])


class _ScalarMLPFn(torch.autograd.Function):
    """``z[n, c] = Σ_k w_out[c, k] GELU(w_in[c, k] h[n, c] + b_in[c, k]) + b_out[c]``.

    With ``pre`` the pre-activations, ``a = GELU(pre)`` and ``g_pre = GELU'(pre) w_out g``
    for the incoming gradient ``g``: ``∂/∂h = Σ_k w_in g_pre``, ``∂/∂w_in = Σ_n h g_pre``,
    ``∂/∂b_in = Σ_n g_pre``, ``∂/∂w_out = Σ_n g a``, ``∂/∂b_out = Σ_n g``.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor,  # type: ignore[override]
                buffers: _Buffers) -> Tensor:
        hT = h.T.contiguous()  # [C, N]
        pre, act = buffers.take((w_in.shape[0], w_in.shape[1], hT.shape[1]), hT)  # [C, H, N] each
        _pre_activations(hT, w_in, b_in, pre)
        torch.ops.aten.gelu.out(pre, out=act)
        z = torch.bmm(w_out[:, None, :], act)[:, 0]  # [C, N]
        ctx.save_for_backward(hT, w_in, w_out, pre, act)
        ctx.buffers = buffers
        return (z + b_out[:, None]).T.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: Tensor):  # type: ignore[override]
        hT, w_in, w_out, pre, act = ctx.saved_tensors
        gzT = gz.T.contiguous()  # [C, N]
        g_w_out = torch.bmm(gzT[:, None, :], act.transpose(1, 2))[:, 0]  # [C, H]; act is free after this
        g_pre = torch.mul(gzT[:, None, :], w_out[:, :, None], out=act)  # dL/d GELU(pre), [C, H, N]
        torch.ops.aten.gelu_backward.grad_input(g_pre, pre, grad_input=g_pre)  # now dL/d pre
        gh = torch.bmm(w_in[:, None, :], g_pre)[:, 0]  # [C, N]
        r = torch.bmm(torch.stack([hT, torch.ones_like(hT)], 1), g_pre.transpose(1, 2))  # [C, 2, H]
        ctx.buffers.give_back(pre)
        return gh.T, r[:, 0], r[:, 1], g_w_out, gzT.sum(1), None



# ------------------------------------------------------------------ the mask function (copied)

def stochastic_source(like: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """The random ``r`` of a mask, shaped like ``like`` (U(0, 1) or fair coin flips)."""
    if kind == "continuous":
        return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if kind == "binomial":
        return torch.randint(0, 2, like.shape, generator=generator, device=like.device).to(like.dtype)
    raise ValueError(f"unknown mask kind {kind!r}; expected 'continuous' or 'binomial'")


def _indicator(compare, z: Tensor, bound: float) -> Tensor:
    """``compare(z, bound)`` as 0./1. in ``z``'s dtype, written directly as floats (a bool
    tensor and its conversion cost ~10x more on CPU)."""
    return compare(z, bound, out=torch.empty_like(z))


class _MaskAndPenalised(torch.autograd.Function):
    """``(m, g_upper, g_lower)`` from ``z`` and the random ``r`` (``g_lower`` without gradient).

    ``m = g_lower + (1 - g_lower) r`` and ``g_upper`` as composed from
    :func:`lower_leaky_hard_sigmoid`, :func:`upper_leaky_hard_sigmoid` and
    :func:`stochastic_mask` (same values to float rounding and the same gradients, also at
    the kinks, where the clamps pass gradient: ``z = 0`` and ``z = 1``), written with clamps
    and float indicators instead of ``torch.where`` on bool masks (slow on CPU), with one
    backward instead of the composed graph's dozen small ops:
    ``g_lower = min(z, 1) + (alpha - 1) min(z, 0)``, ``g_upper = max(z, 0) + (alpha - 1) max(z - 1, 0)``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, r: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        lower = torch.add(z.clamp(max=1.0), z.clamp(max=0.0), alpha=alpha - 1.0)
        upper = torch.add(z.clamp(min=0.0), (z - 1.0).clamp_(min=0.0), alpha=alpha - 1.0)
        mask = torch.addcmul(lower, 1.0 - lower, r)
        ctx.save_for_backward(z, r)
        ctx.alpha = alpha
        ctx.mark_non_differentiable(lower)
        return mask, upper, lower

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mask: Tensor | None, g_upper: Tensor | None, _: Tensor | None):  # type: ignore[override]
        z, r = ctx.saved_tensors
        alpha = ctx.alpha
        grad = torch.zeros_like(z)
        if g_mask is not None:  # d g_lower/dz: alpha for z <= 0, 1 on (0, 1], 0 above
            slope = torch.add(_indicator(torch.le, z, 1.0), _indicator(torch.le, z, 0.0), alpha=alpha - 1.0)
            grad.addcmul_(g_mask * slope, 1.0 - r)
        if g_upper is not None:  # d g_upper/dz: 0 below 0, 1 on [0, 1], alpha above
            slope = torch.add(_indicator(torch.ge, z, 0.0), _indicator(torch.gt, z, 1.0), alpha=alpha - 1.0)
            grad.addcmul_(g_upper, slope)
        return grad, None, None


# ------------------------------------------------------------------ the layer outputs (copied)


def layer_output(dec: Any, path: str, a: Tensor, mask: Tensor | None, delta: Tensor | None = None,
                 inner: Tensor | None = None) -> Tensor:
    comps = dec.comps(path)
    h = a @ comps.V.T if inner is None else inner  # [..., C]
    out = (h if mask is None else h * mask) @ comps.U.T  # [..., d_out]
    bias = dec.target_bias(path)
    if bias is not None:
        out = out + bias
    if delta is not None:
        out = out + delta.unsqueeze(-1) * (a @ (dec.target_weight(path) - comps.U @ comps.V).T)
    return out


def layer_output_from_target(dec: Any, path: str, inner: Tensor, mask: Tensor | None, delta: Tensor | None,
                             target_out: Tensor) -> Tensor:
    comps = dec.comps(path)
    if delta is None:
        return layer_output(dec, path, inner, mask, None, inner=inner)
    d = delta.unsqueeze(-1)  # [..., 1]
    m = d.new_ones(()) if mask is None else mask
    out = (inner * (m - d)) @ comps.U.T + d * target_out
    bias = dec.target_bias(path)
    return out if bias is None else out + (1.0 - d) * bias


# ------------------------------------------------------------------ the batched passes (copied)
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


class _BatchedLayer:
    """Substitute for one decomposed layer in the batched passes: ``n`` stacked copies of ``b`` rows.

    Copy 0 (stochastic) and this layer's own layerwise copy compute with the masked
    subcomponents; the other copies keep ``W a + b``. Where a copy's input is still the
    target's (``unchanged``), ``V a`` is the inner activation already computed and
    ``W a + b`` the target's own output (``known``), so neither is recomputed; the module
    itself runs only on the rows of kept (or delta) copies whose input has changed.
    """

    def __init__(self, dec: Any, path: str, own: int | None, b: int, unchanged: list[bool],
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
                h = self.inner if same else piece @ dec.comps(self.path).V.T
                if self.delta is None:
                    outs.append(layer_output(dec, self.path, piece, self.mask, None, inner=h))
                else:
                    own = self._module_output(original, piece, same)
                    outs.append(layer_output_from_target(dec, self.path, h, self.mask, self.delta, own))
            else:
                outs.append(self._module_output(original, piece, same))
        return torch.cat(outs).to(dec.target_weight(self.path).dtype)

    def _module_output(self, original: Any, piece: Tensor, same: bool) -> Tensor:
        """``W a + b`` on one copy: the target's when the copy's input is, else computed."""
        return self.known if same and self.known is not None else original(piece)


def batched_masked_passes(model: torch.nn.Module, dec: Any, inputs: Any, acts: Mapping[str, Tensor],
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


def _checked(dec: Any, prefix: tuple[str, ...], forward: Any) -> tuple[str, ...]:
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


# ------------------------------------------------------------------ the target pass and the objective (copied)


def target_pass_keeping(model: torch.nn.Module, dec: Any, inputs: Any) -> tuple[Tensor, dict, dict]:
    sites = {path: Site(path, io="input") for path in dec.paths}
    plan = reuse_plan(model, dec.paths, inputs, batch_size_of(inputs), dec)
    outs = {path: Site(path) for path in (*dec.paths, *plan.prefix)}
    with torch.no_grad():
        out, acts = run(model, inputs, cache=[*sites.values(), *outs.values()], check_finite=False)
    y = output_logits(out)
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise SPDError("the target model's output is not finite")
    return y, {path: acts[site] for path, site in sites.items()}, {path: acts[site] for path, site in outs.items()}


def importance_logits(dec: Any, path: str, h: Tensor) -> Tensor:  # [..., C] -> [..., C]
    """The fused scalar-MLP importance of one hidden layer (the bench targets' ``ci_fn``)."""
    imp = dec.importance[path.replace(".", "__") or "__root__"]
    if getattr(imp, "w_mid", None) or not hasattr(imp, "w_in"):
        raise SPDError("the frozen step copies the one-hidden-layer scalar MLP importance only")
    if not hasattr(imp, "_today_work"):
        imp._today_work = _Buffers()
    flat = h.reshape(-1, imp.C)
    z = _ScalarMLPFn.apply(flat, imp.w_in, imp.b_in, imp.w_out, imp.b_out, imp._today_work)
    return z.reshape(*h.shape[:-1], imp.C)


def objective(dec: Any, inputs: Any, frac: float, generator: torch.Generator | None) -> dict[str, Any]:
    """``SPDObjective(dec)(inputs, frac, generator)`` as it was (batched passes, mse or no other)."""
    cfg = dec.cfg
    if cfg.recon != "mse" and cfg.recon != "kl":
        raise SPDError(f"unknown reconstruction {cfg.recon!r}")
    target, acts, known = target_pass_keeping(dec.model, dec, inputs)
    inner, z = {}, {}
    for path in dec.paths:
        inner[path] = acts[path] @ dec.comps(path).V.T  # [batch, (pos,) C]
        z[path] = importance_logits(dec, path, inner[path])
    masks, g_upper, g_lower = {}, {}, {}
    for path in dec.paths:
        r = stochastic_source(z[path], cfg.mask, generator)
        masks[path], g_upper[path], g_lower[path] = _MaskAndPenalised.apply(z[path], r, cfg.leak)
    deltas = {p: stochastic_source(torch.empty(z[p].shape[:-1], dtype=z[p].dtype), cfg.mask, generator)
              if cfg.faithfulness == "delta" else None for p in dec.paths}
    layerwise = cfg.layerwise_coeff > 0
    outs = batched_masked_passes(dec.model, dec, inputs, acts, inner, masks, deltas, layerwise, known)
    if cfg.recon == "mse":
        recon = lambda y: (y - target).pow(2).mean()  # noqa: E731
    else:
        def recon(y: Tensor) -> Tensor:
            t = F.log_softmax(target.float(), dim=-1)
            return (t.exp() * (t - F.log_softmax(y.float(), dim=-1))).sum(-1).mean()
    stochastic = recon(outs[0])
    lw = torch.stack([recon(y) for y in outs[1:]]).mean() if layerwise else stochastic.new_zeros(())
    start, end = cfg.p_anneal_start, cfg.p_anneal_end
    if cfg.p_final is None or frac <= start:
        p = cfg.p
    else:
        p = cfg.p_final if frac >= end or end <= start else cfg.p + (cfg.p_final - cfg.p) * (frac - start) / (end - start)
    imp = None
    for g in g_upper.values():
        term = (g + EPS).pow(p).reshape(-1, g.shape[-1]).sum(-1).mean()
        imp = term if imp is None else imp + term
    total = cfg.stochastic_coeff * stochastic + cfg.layerwise_coeff * lw + cfg.importance_coeff * imp
    if cfg.faithfulness == "loss":
        raise SPDError("the frozen step copies the delta faithfulness (the bench targets' setting) only")
    with torch.no_grad():
        faith = dec.faithfulness()
        l0 = {path: torch.gt(g, ALIVE_CI, out=torch.empty_like(g)).sum(-1).mean() for path, g in g_lower.items()}
    return {"total": total, "stochastic": stochastic, "layerwise": lw, "importance": imp, "faithfulness": faith,
            "p": p, "l0": l0}


def today_step(s: dict[str, Any]) -> None:
    """One training step of a bench setup with today's step (data, objective, backward, fused AdamW)."""
    x = s["data"](s["cfg"].batch_size, s["gen"])
    out = objective(s["dec"], x, 0.5, s["gen"])
    s["opt"].zero_grad(set_to_none=True)
    out["total"].backward()
    s["opt"].step()
