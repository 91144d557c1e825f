"""Metrics of a sparse dictionary, with one fixed definition each (spec §3).

On activations (:func:`evaluate`, streaming over batches, sums in fp64):

- **L0**: mean number of latents ``≠ 0`` per token (``≠``, so signed codes count).
- **FVU** (fraction of variance unexplained) ``= Σ‖y − ŷ‖² / (Σ‖y‖² − N‖ȳ‖²)``: the
  variance is taken about the mean over all N tokens (not per batch, not ``‖y‖²`` as in
  OpenAI's normalised MSE). Explained variance ``= 1 − FVU``.
- **MSE**: ``Σ‖y − ŷ‖² / N`` (summed over dimensions, averaged over tokens).
- **density** of a latent: the fraction of tokens on which it is ``≠ 0``. **Dead**: no firing
  over a stated window of tokens, one definition everywhere: here the window is the evaluated
  tokens (``dead_window_tokens``); in the trainer's history it is the last ``dead_tokens``
  tokens (it counts tokens since each latent last fired). **Dense**: density above 1 % and above 10 % (SAEBench).
- **shrinkage** ``γ = E‖ŷ‖² / E[y·ŷ]`` (Gated SAE paper, eq. 10): below 1 the
  reconstruction is shrunk towards 0; also the mean of ``‖ŷ‖/‖y‖``.

Against ground-truth directions ``G [n, d]`` (rows) and the decoder ``W_dec [m, d]``,
both compared by cosine:

- **MMCS** ``= meanᵢ maxⱼ cos(Gᵢ, W_dec,j)`` (Sharkey et al.): every true feature's best match;
- **MCC** (Hungarian-matched): the mean ``|cos|`` under the one-to-one matching of true
  features to latents that maximises it (``sae_lens.synthetic`` MCC);
- **recovered**: the fraction of true features with a latent at ``cos > 0.9``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from mechscope.sae.arch import SAE, SAEError


def l0(f: Tensor) -> float:
    """Mean number of non-zero latents per token of a code ``[..., d_sae]``."""
    return float((f != 0).sum()) / max(1, f.numel() // f.shape[-1])


class ReconstructionStats:
    """Streaming sums for :func:`evaluate` (fp64)."""

    def __init__(self, d_sae: int, d_out: int) -> None:
        self.n = 0
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum_y = torch.zeros(d_out, dtype=torch.float64)
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.nonzero = 0.0
        self.dot = 0.0  # Σ y·ŷ
        self.hat_sq = 0.0  # Σ ‖ŷ‖²
        self.norm_ratio = 0.0  # Σ ‖ŷ‖/‖y‖ over tokens with y ≠ 0
        self.ratio_n = 0

    @torch.no_grad()
    def add(self, y: Tensor, y_hat: Tensor, f: Tensor) -> None:
        y, y_hat, nz = y.double().cpu(), y_hat.double().cpu(), (f != 0).cpu()
        self.n += y.shape[0]
        self.sse += float((y - y_hat).pow(2).sum())
        self.sum_sq += float(y.pow(2).sum())
        self.sum_y += y.sum(0)
        self.fires += nz.sum(0).double()
        self.nonzero += float(nz.sum())
        self.dot += float((y * y_hat).sum())
        self.hat_sq += float(y_hat.pow(2).sum())
        norms = y.norm(dim=-1)
        ok = norms > 0
        self.norm_ratio += float((y_hat.norm(dim=-1)[ok] / norms[ok]).sum())
        self.ratio_n += int(ok.sum())

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise SAEError("no tokens were evaluated: the data was empty")
        var = self.sum_sq - float(self.sum_y.pow(2).sum()) / self.n  # Σ‖y − ȳ‖²
        fvu = self.sse / var if var > 0 else math.inf
        density = (self.fires / self.n).float()  # [d_sae]
        return {
            "n_tokens": self.n,
            "l0": self.nonzero / self.n,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": self.sse / self.n,
            "dead_fraction": float((density == 0).float().mean()),
            "dead_window_tokens": self.n,  # "dead": no firing over this window (training: --dead-tokens)
            "dense_1pct": float((density > 0.01).float().mean()),
            "dense_10pct": float((density > 0.10).float().mean()),
            "shrinkage": self.hat_sq / self.dot if self.dot != 0 else math.nan,
            "norm_ratio": self.norm_ratio / max(self.ratio_n, 1),
            "density": density,
        }


def _pair(batch: Any, sae: SAE) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Tensor):
        if sae.cfg.kind != "sae":
            raise SAEError(f"evaluating a {sae.cfg.kind} needs (x, y) batches: its input and the target it predicts")
        return batch, batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise SAEError(f"evaluation data must yield tensors [batch, d_in] or (x, y) pairs, got {type(batch).__name__}")


@torch.no_grad()
def evaluate(sae: SAE, data: Iterable[Any], max_batches: int | None = None) -> dict[str, Any]:
    """Every activation metric of the module docstring over ``data`` (rows or (x, y) pairs).

    ``density`` in the result is a ``[d_sae]`` tensor; the rest are numbers.
    """
    stats = ReconstructionStats(sae.d_sae, sae.d_out)
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _pair(batch, sae)
        x = x.reshape(-1, x.shape[-1]).to(sae.W_enc.device, sae.W_enc.dtype)
        y = y.reshape(-1, y.shape[-1]).to(x.device, x.dtype)
        f = sae.encode(x)
        stats.add(y, sae.decode(f, x), f)
    return stats.result()


def density_histogram(density: Tensor, bins: int = 40, low: float = -8.0) -> dict[str, Any]:
    """Histogram of log10 feature density; dead latents (density 0) are counted apart."""
    d = density.double()
    live = d[d > 0]
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(live.log10().clamp(min=low), bins=bins, min=low, max=0.0) if live.numel() else torch.zeros(bins)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()], "dead": int((d == 0).sum())}


# -- against ground truth ----------------------------------------------------------------
def cosine_matrix(truth: Tensor, dictionary: Tensor) -> Tensor:  # [n, d], [m, d] -> [n, m]
    """Cosine of every true direction with every dictionary direction (rows), in fp64."""
    if truth.dim() != 2 or dictionary.dim() != 2 or truth.shape[1] != dictionary.shape[1]:
        raise SAEError(f"ground truth [n, d] and dictionary [m, d] must share d; got {list(truth.shape)} "
                       f"and {list(dictionary.shape)} (pass the decoder W_dec, whose rows are the directions)")
    t = truth.detach().double()
    w = dictionary.detach().double()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return t @ w.T


def mmcs(truth: Tensor, dictionary: Tensor) -> float:
    """Mean over true features of the best cosine with any dictionary direction."""
    return float(cosine_matrix(truth, dictionary).max(dim=1).values.mean())


def recovered_fraction(truth: Tensor, dictionary: Tensor, threshold: float = 0.9) -> float:
    """Fraction of true features with some dictionary direction at cosine above ``threshold``."""
    return float((cosine_matrix(truth, dictionary).max(dim=1).values > threshold).double().mean())


def hungarian(score: Tensor) -> tuple[Tensor, Tensor]:
    """One-to-one matching of rows to columns that maximises the total ``score`` [n, m]."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is a dependency
        raise ImportError("the Hungarian matching needs scipy: pip install scipy") from e
    rows, cols = linear_sum_assignment(score.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(rows), torch.as_tensor(cols)


def matched_correlation(truth: Tensor, dictionary: Tensor) -> float:
    """Mean |cosine| under the best one-to-one matching of true features to latents (MCC).

    With fewer latents than true features, only ``m`` features can be matched and the
    mean is over those.
    """
    score = cosine_matrix(truth, dictionary).abs()
    rows, cols = hungarian(score)
    return float(score[rows, cols].mean())
