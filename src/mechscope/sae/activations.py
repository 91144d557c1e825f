"""Training-time activations: JumpReLU with straight-through θ-gradients, and BatchTopK.

**JumpReLU** (arXiv 2407.14435): ``f = h·H(h − θ)``. ``H`` has zero derivative almost
everywhere, so the gradient with respect to θ uses a rectangle kernel
``K(u) = 1[|u| < ½]`` of bandwidth ε (the straight-through estimator):

- ``∂f/∂θ = −(θ/ε) K((h − θ)/ε)``  (through the reconstruction),
- ``∂H/∂θ = −(1/ε) K((h − θ)/ε)``  (through the L0 penalty).

θ is a plain fp32 parameter (spec §1.4: ``log θ`` barely moves under Adam, bf16 θ rounds
its updates away). By default the L0 gradient reaches θ only (DeepMind);
``ste_to_input=True`` also sends ``+(1/ε)K`` to ``h`` (Anthropic, SAELens
``jumprelu_ste_to_input``).

**BatchTopK** (arXiv 2412.06410): keep the ``B·k`` largest of the whole batch's
``ReLU(h)``, so tokens share a budget of k latents on average.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernel(h: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel ``K((h − θ)/ε) = 1[|h − θ| < ε/2]`` as h's dtype."""
    return ((h - theta).abs() < bandwidth / 2).to(h.dtype)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back down to θ's shape ``[d_sae]``."""
    return t.reshape(-1, t.shape[-1]).sum(0).reshape(shape)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, theta, bandwidth):
        th = theta.to(h.dtype)
        ctx.save_for_backward(h, th)
        ctx.bandwidth = bandwidth
        ctx.theta_dtype = theta.dtype
        return h.relu() * (h > th)

    @staticmethod
    def backward(ctx, grad):
        h, th = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad * ((h > th) & (h > 0)).to(grad.dtype)
        grad_theta = _sum_to(-(th / eps) * _kernel(h, th, eps) * grad, th.shape)
        return grad_h, grad_theta.to(ctx.theta_dtype), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, theta, bandwidth, to_input):
        th = theta.to(h.dtype)
        ctx.save_for_backward(h, th)
        ctx.bandwidth, ctx.to_input, ctx.theta_dtype = bandwidth, to_input, theta.dtype
        return (h > th).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, th = ctx.saved_tensors
        eps = ctx.bandwidth
        k = _kernel(h, th, eps) * grad / eps
        grad_h = k if ctx.to_input else None
        return grad_h, _sum_to(-k, th.shape).to(ctx.theta_dtype), None, None


def jumprelu(h: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """``ReLU(h)·1[h > θ]`` with the straight-through θ-gradient. ``h [..., d_sae]``, ``θ [d_sae]``."""
    return _JumpReLU.apply(h, theta, float(bandwidth))


def step(h: Tensor, theta: Tensor, bandwidth: float, ste_to_input: bool = False) -> Tensor:
    """``1[h > θ]`` (whose sum over latents is the L0) with the straight-through θ-gradient."""
    return _Step.apply(h, theta, float(bandwidth), bool(ste_to_input))


def batch_topk(h: Tensor, k: int) -> Tensor:  # [B, d_sae] -> [B, d_sae]
    """Keep the ``B·k`` largest entries of ``ReLU(h)`` over the whole batch; zero the rest.

    Gradients flow to the kept entries. The batch's L0 averages k (less when fewer than
    ``B·k`` entries are positive).
    """
    acts = h.relu()
    flat = acts.reshape(-1)
    n = min(k * h.shape[0], flat.numel())
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(h)


def min_positive(f: Tensor) -> Tensor | None:
    """Smallest positive entry of a code (the BatchTopK threshold sample), or None if none is."""
    pos = f[f > 0]
    return pos.min() if pos.numel() else None
