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

Speed: the scalar MLPs are the largest tensors of a toy-model step (``[batch, C, 16]``
per layer). With one hidden layer (the default) they run through
:class:`_ScalarMLPFn`, which processes the batch in cache-sized row blocks, keeps no
``[batch, C, hidden]`` tensor alive between forward and backward (it recomputes the
block in the backward), and so needs neither the memory nor the memory bandwidth of the
plain autograd graph; its gradients equal the plain graph's (tested).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mechscope.spd.components import SPDError

BLOCK_ELEMENTS = 1 << 17  # rows per block such that a [rows, C, hidden] block stays in cache


def _kaiming(shape: tuple[int, ...], fan_in: int, gain: float, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator) * (gain / math.sqrt(fan_in))


class _ScalarMLPFn(torch.autograd.Function):
    """``z[n, c] = Σ_h w_out[c, h] GELU(w_in[c, h] h[n, c] + b_in[c, h]) + b_out[c]``, blockwise."""

    @staticmethod
    def forward(ctx, h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:  # type: ignore[override]
        rows = max(1, BLOCK_ELEMENTS // max(w_in.numel(), 1))
        z = torch.empty_like(h)  # [N, C]
        for s in range(0, h.shape[0], rows):
            pre = torch.addcmul(b_in, h[s:s + rows, :, None], w_in)  # [rows, C, H]
            z[s:s + rows] = F.gelu(pre).mul_(w_out).sum(-1)
        z += b_out
        ctx.save_for_backward(h, w_in, b_in, w_out)
        ctx.rows = rows
        return z

    @staticmethod
    def backward(ctx, gz: Tensor):  # type: ignore[override]
        h, w_in, b_in, w_out = ctx.saved_tensors
        rows = ctx.rows
        gh = torch.empty_like(h)
        g_w_in, g_b_in, g_w_out = torch.zeros_like(w_in), torch.zeros_like(b_in), torch.zeros_like(w_out)
        for s in range(0, h.shape[0], rows):
            hb, gzb = h[s:s + rows, :, None], gz[s:s + rows, :, None]  # [rows, C, 1]
            pre = torch.addcmul(b_in, hb, w_in)  # recomputed: [rows, C, H]
            g_w_out += F.gelu(pre).mul_(gzb).sum(0)
            g_pre = torch.ops.aten.gelu_backward(gzb * w_out, pre)  # [rows, C, H]
            g_b_in += g_pre.sum(0)
            gh[s:s + rows] = (g_pre * w_in).sum(-1)
            g_w_in += g_pre.mul_(hb).sum(0)
        return gh, g_w_in, g_b_in, g_w_out, gz.sum(0)


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
            return _ScalarMLPFn.apply(flat, self.w_in, self.b_in, self.w_out, self.b_out).reshape(*lead, self.C)
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
