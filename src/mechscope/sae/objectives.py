"""Training objectives, one pure function per architecture (spec §1).

Each takes the dictionary, a batch of inputs ``x [B, d_in]`` and targets ``y [B, d_out]``
(``y = x`` for an autoencoder) in the trainer's normalised units, plus the step's
:class:`LossSettings`, and returns a :class:`StepOutput` whose ``loss`` is to be
minimised. Definitions:

- **relu** (Anthropic April 2024): ``Σ_d (y − ŷ)²`` averaged over tokens
  ``+ λ Σᵢ fᵢ‖W_dec,i‖``.
- **topk**, **batchtopk** (Gao et al.; Bussmann et al.): ``FVU = Σ‖e‖² / Σ‖y − ȳ‖²``
  over the batch, ``+ α · min(n_dead/k_aux, 1) · ‖ê_aux − e‖² / Σ‖e − ē‖²`` (AuxK) where
  ``ê_aux`` decodes, with no bias, the top ``k_aux`` pre-activations of dead latents and
  ``e`` is detached.
- **matryoshka**: the mean over nested prefixes ``m₁ < … < m`` of the FVU of the
  reconstruction from the first ``mⱼ`` latents, plus AuxK on the full residual.
- **jumprelu**: ``Σ_d (y − ŷ)²`` averaged over tokens ``+ λ·P(L0)`` with
  ``P = (L0/k − 1)²`` (``target``, dictionary_learning) or ``P = L0`` (``linear``, the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

from mechscope.sae.activations import batch_topk, jumprelu, min_positive, step
from mechscope.sae.arch import SAE
from mechscope.sae.kernels import sparse_decode, topk_encode


class ObjectiveOptions(Protocol):
    """The fixed settings an objective reads: :class:`mechscope.sae.train.TrainConfig`'s fields
    of these names, read where they are declared rather than copied."""

    aux_alpha: float
    l0_coefficient: float
    l0_penalty: Literal["target", "linear"]
    ste_to_input: bool


@dataclass(frozen=True)
class _Defaults:
    aux_alpha: float = 1 / 32
    l0_coefficient: float = 1.0
    l0_penalty: Literal["target", "linear"] = "target"
    ste_to_input: bool = False


@dataclass(frozen=True)
class LossSettings:
    """What an objective reads at one step: the values that change during a run (the dead
    latents, the scheduled L1 coefficient), AuxK's k (an architecture default filled in), and
    the run's fixed options (``options``: the TrainConfig)."""

    dead: Tensor | None = None  # long [n_dead]: latents counted dead, for AuxK
    k_aux: int = 0
    l1_coefficient: float = 1.0
    options: ObjectiveOptions = _Defaults()


@dataclass
class StepOutput:
    """What one objective evaluation gives the trainer."""

    loss: Tensor  # scalar, differentiable
    parts: dict[str, float]  # named terms (recon, aux, sparsity, ...)
    y_hat: Tensor  # [B, d_out], detached
    fired: Tensor  # [d_sae] bool: latents non-zero on some token of the batch
    l0: float  # mean number of non-zero latents per token
    min_act: Tensor | None = None  # smallest kept activation (BatchTopK threshold sample)


def _fvu(e: Tensor, y: Tensor) -> Tensor:
    """Σ‖e‖² / Σ‖y − ȳ‖² over a batch (fraction of variance unexplained)."""
    return e.pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)


def _plus_skip(y_hat: Tensor, sae: SAE, x: Tensor) -> Tensor:
    """``y_hat + x W_skipᵀ`` for a skip transcoder; ``y_hat`` itself otherwise (no extra pass)."""
    return y_hat + x @ sae.W_skip.T if sae.cfg.kind == "skip_transcoder" else y_hat


def _aux_loss(sae: SAE, e: Tensor, h_dead: Tensor, s: LossSettings) -> Tensor | None:
    """AuxK: the top ``k_aux`` dead pre-activations reconstruct the detached residual, no bias.

    ``h_dead [B, n_dead]`` are the dead latents' pre-activations; the aux code lives on that
    block only (dense there), decoded by those latents' decoder rows.
    """
    if s.dead is None or s.dead.numel() == 0 or s.k_aux <= 0:
        return None
    e = e.detach()
    vals, j = h_dead.topk(min(s.k_aux, s.dead.numel()), dim=-1, sorted=False)  # [B, k_aux]
    code = torch.zeros_like(h_dead).scatter(1, j, vals.relu())  # [B, n_dead]
    e_hat = code @ sae.W_dec.index_select(0, s.dead)  # [B, d_out]
    scale = min(s.dead.numel() / s.k_aux, 1.0)
    return s.options.aux_alpha * scale * _fvu(e_hat - e, e)


def _fired(sae: SAE, idx: Tensor, vals: Tensor) -> Tensor:
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=idx.device)
    fired[idx[vals > 0]] = True
    return fired


def topk_objective(sae: SAE, x: Tensor, y: Tensor, s: LossSettings) -> StepOutput:
    """TopK + AuxK on the sparse kernels (no dense code is built)."""
    b_pre = sae.b_dec if sae.cfg.subtracts_b_dec else None
    dead = s.dead if s.dead is not None and s.dead.numel() and s.k_aux > 0 else None
    vals, idx, h_dead = topk_encode(x, b_pre, sae.W_enc, sae.b_enc, sae.cfg.k, dead)
    y_hat = _plus_skip(torch.add(sparse_decode(vals, idx, sae.W_dec), sae.b_dec), sae, x)  # [B, d_out]
    e = y - y_hat
    recon = _fvu(e, y)
    aux = _aux_loss(sae, e, h_dead, s)
    loss = recon if aux is None else recon + aux
    parts = {"recon": recon.item(), "aux": aux.item() if aux is not None else 0.0}
    l0 = float((vals > 0).sum()) / x.shape[0]
    return StepOutput(loss, parts, y_hat.detach(), _fired(sae, idx, vals), l0)


def batchtopk_objective(sae: SAE, x: Tensor, y: Tensor, s: LossSettings) -> StepOutput:
    """BatchTopK (and Matryoshka BatchTopK, on nested prefixes) + AuxK."""
    h = sae.pre_acts(x)  # [B, m]
    f = batch_topk(h, sae.cfg.k)  # [B, m]
    if sae.cfg.arch == "matryoshka":
        widths, start = sae.cfg.widths(), 0
        y_hat = _plus_skip(sae.b_dec.expand(x.shape[0], -1), sae, x)
        levels = []
        for w in widths:  # cumulative reconstruction from the first w latents
            y_hat = y_hat + f[:, start:w] @ sae.W_dec[start:w]
            levels.append(_fvu(y - y_hat, y))
            start = w
        recon = torch.stack(levels).mean()
        parts = {"recon": recon.item(), "recon_full": levels[-1].item()}
    else:
        y_hat = _plus_skip(f @ sae.W_dec + sae.b_dec, sae, x)
        recon = _fvu(y - y_hat, y)
        parts = {"recon": recon.item()}
    h_dead = h.index_select(1, s.dead) if s.dead is not None else None
    aux = _aux_loss(sae, y - y_hat, h_dead, s)
    parts["aux"] = aux.item() if aux is not None else 0.0
    fd = f.detach()
    nz = fd > 0
    return StepOutput(recon if aux is None else recon + aux, parts, y_hat.detach(), nz.any(0),
                      float(nz.sum()) / x.shape[0], min_positive(fd))


def jumprelu_objective(sae: SAE, x: Tensor, y: Tensor, s: LossSettings) -> StepOutput:
    """MSE + λ·P(L0), θ trained through the straight-through estimator."""
    h = sae.pre_acts(x)  # [B, m]
    eps = sae.cfg.bandwidth
    f = jumprelu(h, sae.threshold, eps)
    y_hat = _plus_skip(f @ sae.W_dec + sae.b_dec, sae, x)
    mse = (y - y_hat).pow(2).sum(-1).mean()
    l0 = step(h, sae.threshold, eps, s.options.ste_to_input).sum(-1).mean()  # differentiable L0
    penalty = (l0 / sae.cfg.k - 1) ** 2 if s.options.l0_penalty == "target" else l0
    loss = mse + s.options.l0_coefficient * penalty
    fd = f.detach()
    parts = {"recon": mse.item(), "sparsity": penalty.item(), "fvu": _fvu(y - y_hat.detach(), y).item()}
    return StepOutput(loss, parts, y_hat.detach(), (fd > 0).any(0), float((fd > 0).sum()) / x.shape[0])


def relu_objective(sae: SAE, x: Tensor, y: Tensor, s: LossSettings) -> StepOutput:
    """MSE + λ Σᵢ fᵢ‖W_dec,i‖ (the decoder norm inside the penalty: no norm constraint needed)."""
    f = sae.pre_acts(x).relu()  # [B, m]
    y_hat = _plus_skip(f @ sae.W_dec + sae.b_dec, sae, x)
    mse = (y - y_hat).pow(2).sum(-1).mean()
    l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    loss = mse + s.l1_coefficient * l1
    fd = f.detach()
    parts = {"recon": mse.item(), "sparsity": l1.item(), "fvu": _fvu(y - y_hat.detach(), y).item()}
    return StepOutput(loss, parts, y_hat.detach(), (fd > 0).any(0), float((fd > 0).sum()) / x.shape[0])


OBJECTIVES: dict[str, Callable[[SAE, Tensor, Tensor, LossSettings], StepOutput]] = {
    "relu": relu_objective,
    "topk": topk_objective,
    "batchtopk": batchtopk_objective,
    "matryoshka": batchtopk_objective,
    "jumprelu": jumprelu_objective,
}
