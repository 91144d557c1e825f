"""Evaluating a decomposition: live subcomponents, recovered mechanisms, importance structure,
and reconstruction under masks.

- :func:`live_counts` / :func:`live_mask`: subcomponents with ``‖U_c V_c‖`` at least 10 % of
  the layer's largest (the rest shrink to ~0 when SPD works).
- :func:`mmcs_ml2r`: mean over target mechanisms ``j`` of the best cosine between a
  subcomponent ``U_c V_c`` and the mechanism (a rank-one matrix such as ``W[:, j] e_jᵀ``),
  and the norm ratio at the best match (``ML2R``).
- :func:`importance_matrix`: importances on chosen inputs (e.g. each feature alone at
  0.75); :func:`identity_report` matches its columns to the inputs by the Hungarian
  method and counts violations of "diagonal ≥ 0.9, off-diagonal ≤ 0.1";
  :func:`dense_report` checks a layer that should use ``k`` subcomponents on every input
  (the "+ID" identity); :func:`ablation_effects` says what ablating one subcomponent on
  one input actually does (is a zero importance there right?).
- :func:`reconstruction_losses`: the output distance under importance masks, stochastic
  masks, no masks and all-zero masks; :func:`lm_metrics`: CE and KL of a language model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F

from mechscope.spd.components import SPDError
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.losses import kl, reconstruction
from mechscope.spd.masks import lower_leaky_hard_sigmoid, stochastic_mask
from mechscope.spd.passes import masked_forward, target_pass

LIVE_REL = 0.1  # live: ‖U_c V_c‖ >= 10 % of the layer's largest subcomponent
ALIVE_CI = 0.1  # a column of an importance matrix is kept when some input gives it more than this


def live_mask(norms: Tensor, rel: float = LIVE_REL) -> Tensor:  # [C] -> bool [C]
    return norms >= rel * norms.max().clamp_min(1e-12)


def live_counts(dec: Decomposition, rel: float = LIVE_REL) -> dict[str, tuple[int, int]]:
    """``{path: (live, C)}``."""
    return {p: (int(live_mask(n, rel).sum()), int(n.numel())) for p, n in dec.subcomponent_norms().items()}


def tms_mechanisms(W: Tensor) -> Tensor:  # [m, n] -> [n, m, n]
    """TMS's mechanisms in its encoder: feature ``j``'s rank-one matrix ``W[:, j] e_jᵀ``."""
    m, n = W.shape
    eye = torch.eye(n, dtype=W.dtype)
    return W.T[:, :, None] * eye[:, None, :]


def mmcs_ml2r(dec: Decomposition, path: str, mechanisms: Tensor) -> dict[str, Any]:
    """Best-matching subcomponent per mechanism ``[n, d_out, d_in]``: MMCS, ML2R and the matches."""
    with torch.no_grad():
        sub = dec.comps(path).subcomponent_weights().double().flatten(1)  # [C, d_out*d_in]
        mech = mechanisms.double().flatten(1)  # [n, d_out*d_in]
        cos = (mech @ sub.T) / (mech.norm(dim=1, keepdim=True) * sub.norm(dim=1).clamp_min(1e-12))  # [n, C]
        best = cos.max(dim=1)
        ratio = sub.norm(dim=1)[best.indices] / mech.norm(dim=1).clamp_min(1e-12)
    return {"mmcs": float(best.values.mean()), "ml2r": float(ratio.mean()), "cos": best.values.tolist(),
            "match": best.indices.tolist(), "ratio": ratio.tolist(), "cos_matrix": cos}


def importance_matrix(model: nn.Module, dec: Decomposition, inputs: Any) -> dict[str, Tensor]:
    """Importances (hard sigmoid) of every subcomponent on each input: ``{path: [n_inputs, C]}``."""
    with torch.no_grad():
        _, acts = target_pass(model, dec, inputs)
        return dec.causal_importance(acts, "hard")


def alive_columns(ci: Tensor, threshold: float = ALIVE_CI) -> Tensor:  # [n, C] -> indices
    return torch.nonzero(ci.max(dim=0).values > threshold).flatten()


def identity_report(ci: Tensor, diag_min: float = 0.9, off_max: float = 0.1, threshold: float = ALIVE_CI) -> dict[str, Any]:
    """Match the alive columns of ``ci`` ``[n_inputs, C]`` to the inputs (Hungarian) and count violations.

    The permuted matrix has the matched column of each input on the diagonal, then the
    unmatched alive columns. A violation is a diagonal entry below ``diag_min``, an input
    left without a column, or an off-diagonal entry above ``off_max``.
    """
    cols = alive_columns(ci, threshold)
    sub = ci[:, cols].double()  # [n, k]
    n, k = sub.shape
    rows, matched = linear_sum_assignment(sub.numpy(), maximize=True) if k else (np.array([], int), np.array([], int))
    order = [int(matched[list(rows).index(i)]) if i in rows else None for i in range(n)]
    used = [c for c in order if c is not None]
    perm = used + [c for c in range(k) if c not in used]
    permuted = sub[:, perm] if k else sub
    diag = torch.tensor([float(sub[i, c]) if c is not None else 0.0 for i, c in enumerate(order)], dtype=torch.float64)
    off = permuted.clone()
    for i, c in enumerate(order):
        if c is not None:
            off[i, used.index(c)] = float("nan")
    off_vals = off[~torch.isnan(off)]
    violations = int((diag < diag_min).sum()) + int((off_vals > off_max).sum())
    return {"n_alive": k, "columns": [int(cols[c]) for c in perm], "violations": violations,
            "diag_min": float(diag.min()) if n else 0.0,
            "offdiag_max": float(off_vals.max()) if off_vals.numel() else 0.0,
            "matrix": permuted}


def dense_report(ci: Tensor, k: int, block_min: float = 0.9, off_max: float = 0.1,
                 threshold: float = ALIVE_CI) -> dict[str, Any]:
    """A layer that should use exactly ``k`` subcomponents on every input: the ``k`` columns of
    highest mean importance form the block (all ≥ ``block_min``), every other alive column
    must stay ≤ ``off_max``.

    ``column_errors`` is the reference implementation's looser count (its ``DenseCIPattern``
    with one required entry): block columns without a single entry ≥ ``block_min``, plus
    entries of the other columns above ``off_max``. It does not ask the block to be
    important on every input, which a minimal decomposition need not be (see
    :func:`ablation_effects`).
    """
    cols = alive_columns(ci, threshold)
    sub = ci[:, cols].double()
    order = torch.argsort(sub.mean(0), descending=True)
    block, rest = sub[:, order[:k]], sub[:, order[k:]]
    missing = max(k - sub.shape[1], 0)
    violations = int((block < block_min).sum()) + int((rest > off_max).sum()) + missing * ci.shape[0]
    column_errors = int(((block >= block_min).sum(0) == 0).sum()) + int((rest > off_max).sum()) + missing
    return {"n_alive": int(sub.shape[1]), "columns": [int(cols[i]) for i in order], "violations": violations,
            "column_errors": column_errors, "block_min": float(block.min()) if block.numel() else 0.0,
            "rest_max": float(rest.max()) if rest.numel() else 0.0, "matrix": sub[:, order]}


def ablation_effects(model: nn.Module, dec: Decomposition, path: str, inputs: Any,
                     columns: list[int]) -> Tensor:  # [n_inputs, len(columns)]
    """How much ablating one subcomponent of ``path`` changes the output, per input.

    Layer ``path`` runs on its subcomponents (``U V``, no delta), every other layer on the
    target weights. Entry ``[i, j]`` is the squared output change on input ``i`` when only
    subcomponent ``columns[j]`` is masked to 0, divided by the change when every
    subcomponent of the layer is: 0 means the subcomponent does nothing on that input (so a
    zero importance there is right), 1 means it carries the whole layer.
    """
    if path not in dec.info:
        raise SPDError(f"{path!r} is not a decomposed layer; decomposed layers: {dec.paths}")
    bad = [c for c in columns if not 0 <= c < dec.info[path].C]
    if bad:
        raise SPDError(f"subcomponent indices {bad} out of range for {path!r}, which has C = {dec.info[path].C}")
    with torch.no_grad():
        _, acts = target_pass(model, dec, inputs)
        a = acts[path]  # [batch, (pos,) d_in], or token ids [batch, (pos,)] for an embedding
        lead, C = (a.shape if dec.comps(path).takes_tokens else a.shape[:-1]), dec.info[path].C
        full = masked_forward(model, dec, inputs, {path: torch.ones(*lead, C)}).flatten(1)  # [n, out]
        zero = masked_forward(model, dec, inputs, {path: torch.zeros(*lead, C)}).flatten(1)
        scale = (zero - full).pow(2).sum(-1).clamp_min(1e-30)  # [n]
        out = torch.empty(full.shape[0], len(columns))
        for j, c in enumerate(columns):
            mask = torch.ones(*lead, C)
            mask[..., c] = 0.0
            ablated = masked_forward(model, dec, inputs, {path: mask}).flatten(1)
            out[:, j] = (ablated - full).pow(2).sum(-1) / scale
    return out


def _evaluation_masks(model: nn.Module, dec: Decomposition, inputs: Any,
                      seed: int) -> tuple[Tensor, dict[str, dict[str, Tensor | None]]]:
    """The target's output and the four masks evaluations compare: the importances (``ci``),
    one stochastic sample of them (seeded), all ones (``unmasked``) and all zeros (``zero``)."""
    gen = torch.Generator().manual_seed(seed)
    target, acts = target_pass(model, dec, inputs)
    g = {p: lower_leaky_hard_sigmoid(dec.importance_logits(p, acts[p], dec.comps(p).inner(acts[p])), dec.cfg.leak)
         for p in dec.paths}
    return target, {"ci": g, "stochastic": {p: stochastic_mask(v, dec.cfg.mask, gen) for p, v in g.items()},
                    "unmasked": {p: None for p in dec.paths}, "zero": {p: torch.zeros_like(v) for p, v in g.items()}}


def reconstruction_losses(model: nn.Module, dec: Decomposition, inputs: Any, kind: str | None = None,
                          seed: int = 0) -> dict[str, float]:
    """Output distance to the target with every decomposed layer replaced, under four masks:
    the importances themselves (``ci``), one stochastic sample (``stochastic``), all ones
    (``unmasked``: ``U V``) and all zeros (``zero``). No delta component."""
    kind = kind or dec.cfg.recon
    with torch.no_grad():
        target, masks = _evaluation_masks(model, dec, inputs, seed)
        am = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return {name: float(reconstruction(kind, masked_forward(model, dec, inputs, m), target, am))
                for name, m in masks.items()}


def _ce(logits: Tensor, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Next-token cross-entropy, averaged over real (non-padding) predicted positions."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [batch, pos-1]
    if attention_mask is None:
        return nll.mean()
    m = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def lm_metrics(model: nn.Module, dec: Decomposition, inputs: dict[str, Tensor], seed: int = 0) -> dict[str, float]:
    """CE and KL of a language model with its decomposed layers under each mask, and the
    fraction of CE unrecovered ``(CE − CE_target) / (CE_zero − CE_target)`` under CI masks."""
    ids, am = inputs["input_ids"], inputs.get("attention_mask")
    with torch.no_grad():
        target, masks = _evaluation_masks(model, dec, inputs, seed)
        out = {"ce_target": float(_ce(target, ids, am))}
        for name, m in masks.items():
            logits = masked_forward(model, dec, inputs, m)
            out[f"ce_{name}"] = float(_ce(logits, ids, am))
            out[f"kl_{name}"] = float(kl(logits, target, am))
    span = out["ce_zero"] - out["ce_target"]
    out["ce_unrecovered"] = (out["ce_ci"] - out["ce_target"]) / span if abs(span) > 1e-12 else float("nan")
    return out
