"""Causal-importance functions: how much each subcomponent matters on an input.

``g_c(x) ∈ [0, 1]`` predicts how much the output would suffer if subcomponent ``c`` were
ablated on input ``x``. Both forms return the *pre-activation* ``z``; the hard sigmoids of
:mod:`mechscope.spd.masks` turn it into importances.

- :class:`ScalarMLPImportance` (``"mlp"``, the paper's form): one small MLP per
  subcomponent on its own inner activation ``h_c``:
  ``z_c = w_out · GELU(w_in h_c + b_in) + b_out`` (hidden width 16 by default).
- :class:`VectorMLPImportance` (``"vector_mlp"``): one MLP per subcomponent on the whole
  layer input ``a`` (``d_in → 8 → 1``).

Initialisation follows the reference: Kaiming-normal weights (ReLU gain for hidden
layers, linear for the output), zero biases.

Speed: the scalar MLPs are the largest tensors of a toy-model step (``C × hidden`` values
per example and layer) and their exact (erf) GELU and its derivative are most of a TMS
step. With one hidden layer (the default) they run through :class:`_ScalarMLPFn`, a
hand-written forward and backward of the same function that

- works in a ``[C, hidden, N]`` layout (the batch innermost), where every reduction (over
  the hidden units in the forward and for ``∂z/∂h``, over the batch for the parameters'
  gradients) is one batched matrix product instead of a strided sum;
- evaluates GELU once in the forward and its derivative once in the backward (the
  incoming gradient times GELU', in place), in two ``[C, hidden, N]`` buffers (the
  pre-activations and GELU of them) that the module keeps from step to step: a fresh
  multi-megabyte tensor per step costs its page faults again whenever the allocator has
  handed the memory back to the system, which on a loaded machine cost more than the
  GELU itself. The price: those two tensors stay allocated between steps.

Its values and gradients equal the plain autograd graph's to float rounding (tested).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from mechscope.spd.components import SPDError

def _kaiming(shape: tuple[int, ...], fan_in: int, gain: float, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator) * (gain / math.sqrt(fan_in))


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


def scalar_mlp_no_grad(h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """The same ``z`` [N, C] without a graph (evaluation)."""
    hT = h.T.contiguous()
    act = F.gelu(_pre_activations(hT, w_in, b_in, torch.empty(w_in.shape[0], w_in.shape[1], hT.shape[1],
                                                               dtype=hT.dtype, device=hT.device)))
    return (torch.bmm(w_out[:, None, :], act)[:, 0] + b_out[:, None]).T.contiguous()


class ScalarMLPImportance(nn.Module):
    """``"mlp"``: subcomponent ``c``'s importance from its own inner activation ``h_c``."""

    kind = "mlp"

    def __init__(self, C: int, hidden: tuple[int, ...] = (16,), generator: torch.Generator | None = None) -> None:
        super().__init__()
        hidden = tuple(hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise SPDError(f"the importance MLP needs at least one hidden layer of width >= 1, got {list(hidden)}")
        self.C = int(C)
        self.fused = True  # False: the plain autograd graph (same values; for benchmarks and tests)
        self._work = _Buffers()  # reused [C, H, N] work tensors (see the module docstring)
        gain = math.sqrt(2.0)
        self.w_in = nn.Parameter(_kaiming((C, hidden[0]), 1, gain, generator))  # [C, H1]
        self.b_in = nn.Parameter(torch.zeros(C, hidden[0]))
        self.w_mid = nn.ParameterList(nn.Parameter(_kaiming((C, a, b), a, gain, generator))
                                      for a, b in zip(hidden[:-1], hidden[1:]))  # [C, Hi, Hi+1]
        self.b_mid = nn.ParameterList(nn.Parameter(torch.zeros(C, b)) for b in hidden[1:])
        self.w_out = nn.Parameter(_kaiming((C, hidden[-1]), hidden[-1], 1.0, generator))  # [C, H_last]
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, h: Tensor, a: Tensor | None = None) -> Tensor:  # inner acts [..., C] -> z [..., C]
        lead = h.shape[:-1]
        flat = h.reshape(-1, self.C)  # [N, C]
        if self.fused and not self.w_mid:
            params = (self.w_in, self.b_in, self.w_out, self.b_out)
            if torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in params)):
                z = _ScalarMLPFn.apply(flat, *params, self._work)
            else:
                z = scalar_mlp_no_grad(flat, *params)
            return z.reshape(*lead, self.C)
        return self.reference(flat).reshape(*lead, self.C)

    def reference(self, flat: Tensor) -> Tensor:  # [N, C] -> [N, C]
        """The plain autograd form (any depth): the definition the fast path is tested against."""
        x = F.gelu(torch.addcmul(self.b_in, flat[..., None], self.w_in))  # [N, C, H1]
        for w, b in zip(self.w_mid, self.b_mid):
            x = F.gelu(torch.einsum("nch,chk->nck", x, w) + b)
        return (x * self.w_out).sum(-1) + self.b_out


class VectorMLPImportance(nn.Module):
    """``"vector_mlp"``: every subcomponent's importance from the whole layer input ``a``."""

    kind = "vector_mlp"

    def __init__(self, C: int, d_in: int, hidden: tuple[int, ...] = (8,), generator: torch.Generator | None = None) -> None:
        super().__init__()
        hidden = tuple(hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise SPDError(f"the importance MLP needs at least one hidden layer of width >= 1, got {list(hidden)}")
        self.C, self.d_in = int(C), int(d_in)
        widths = (d_in, *hidden)
        gain = math.sqrt(2.0)
        self.weights = nn.ParameterList(nn.Parameter(_kaiming((C, a, b), a, gain, generator))
                                        for a, b in zip(widths[:-1], widths[1:]))  # [C, d, h]
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(C, 1, b)) for b in hidden)
        self.w_out = nn.Parameter(_kaiming((C, hidden[-1], 1), hidden[-1], 1.0, generator))
        self.b_out = nn.Parameter(torch.zeros(C, 1, 1))

    def forward(self, h: Tensor, a: Tensor | None = None) -> Tensor:  # a [..., d_in] -> z [..., C]
        if a is None or not a.is_floating_point():
            raise SPDError("the vector_mlp importance function needs the layer's vector input; "
                           "use ci_fn='mlp' for embeddings (their input is token ids)")
        lead = a.shape[:-1]
        x = a.reshape(1, -1, self.d_in)  # [1, N, d_in], shared by the C MLPs
        for w, b in zip(self.weights, self.biases):
            x = F.gelu(torch.matmul(x, w) + b)  # [C, N, h]
        z = torch.baddbmm(self.b_out, x, self.w_out).squeeze(-1)  # [C, N]
        return z.T.reshape(*lead, self.C)


def make_importance(kind: str, C: int, d_in: int, hidden: tuple[int, ...],
                    generator: torch.Generator | None = None) -> nn.Module:
    """Build a causal-importance function by name (``"mlp"`` or ``"vector_mlp"``)."""
    if kind == "mlp":
        return ScalarMLPImportance(C, hidden, generator)
    if kind == "vector_mlp":
        return VectorMLPImportance(C, d_in, hidden, generator)
    raise SPDError(f"unknown causal-importance function {kind!r}; expected 'mlp' or 'vector_mlp'")
