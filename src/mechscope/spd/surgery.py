"""Surgery with a decomposition: remove the mechanisms one input feature needs.

A decomposition says which subcomponents each input needs (its causal importances).
Subtracting those subcomponents from the weights, ``W' = W − Σ_{c ∈ S} U_c V_c``, should
remove that computation and leave the others: the unlearning use of SPD.

- :func:`feature_subcomponents`: the subcomponents a feature needs and the typical other
  feature does not (importance ≥ 0.5 on the feature alone, mean < 0.5 on the others), so
  a mechanism every input shares (the residual MLP's ``W_out``) is never removed;
- :func:`ablate_weights`: a copy of the model with those subcomponents subtracted (the
  edited model runs without hooks);
- :class:`AblateSubcomponents`: the same edit as an output-site intervention, through the
  core's hooks, without copying the model;
- :func:`unlearning_table`: per-feature error of the original model, the edited model and
  the model with its MLP zero-ablated, on inputs where only that feature is active.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.intervene import Zero
from mechscope.core.run import HookCall, find_module, run
from mechscope.core.site import Site
from mechscope.spd.components import SPDError
from mechscope.spd.decomposition import Decomposition


def feature_subcomponents(ci: Tensor, feature: int, need: float = 0.5, shared: float = 0.5) -> list[int]:
    """Subcomponents (columns of ``ci`` ``[n_features, C]``) feature ``feature`` needs alone."""
    n = ci.shape[0]
    if not 0 <= feature < n:
        raise SPDError(f"feature {feature} is out of range; the importance matrix has {n} features")
    others = torch.cat([ci[:feature], ci[feature + 1:]]).mean(0) if n > 1 else torch.zeros(ci.shape[1])
    return torch.nonzero((ci[feature] >= need) & (others < shared)).flatten().tolist()


def _removed(dec: Decomposition, path: str, cols: Sequence[int]) -> Tensor:  # [d_out, d_in]
    comps = dec.comps(path)
    idx = torch.as_tensor(list(cols), dtype=torch.long)
    return comps.U[:, idx] @ comps.V[idx]


def ablate_weights(model: nn.Module, dec: Decomposition, ablate: Mapping[str, Sequence[int]]) -> nn.Module:
    """A deep copy of ``model`` with ``W − Σ_{c ∈ S} U_c V_c`` at every ``{path: S}``."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for path, cols in ablate.items():
            if path not in dec.info:
                raise SPDError(f"{path!r} is not a decomposed site; decomposed: {dec.paths}")
            kind = dec.info[path].kind
            if kind == "identity":
                raise SPDError(f"{path!r} is an inserted identity, which has no weights to edit; "
                               "use AblateSubcomponents to ablate it through hooks")
            delta = _removed(dec, path, cols)  # [d_out, d_in]
            weight = find_module(edited, path).weight
            weight -= delta if kind == "linear" else delta.T
    return edited


class AblateSubcomponents:
    """Output intervention: subtract the chosen subcomponents' contribution ``U_S V_S a``."""

    def __init__(self, dec: Decomposition, path: str, cols: Sequence[int]) -> None:
        self.dec, self.path, self.cols = dec, path, torch.as_tensor(list(cols), dtype=torch.long)

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        comps = self.dec.comps(self.path)
        h = comps.inner(call.args[0])[..., self.cols]  # [..., |S|]
        return view - h @ comps.U[:, self.cols].T


def ablation_interventions(dec: Decomposition, ablate: Mapping[str, Sequence[int]]) -> list[tuple[Site, Any]]:
    return [(Site(p), AblateSubcomponents(dec, p, cols)) for p, cols in ablate.items()]


def single_feature_inputs(n_features: int, per_feature: int, generator: torch.Generator) -> Tensor:
    """``[n_features, per_feature, n_features]``: feature k alone at values U(0, 1]."""
    values = 1.0 - torch.rand(n_features, per_feature, generator=generator)  # (0, 1]
    x = torch.zeros(n_features, per_feature, n_features)
    idx = torch.arange(n_features)
    x[idx, :, idx] = values
    return x


def per_feature_error(model: nn.Module, x: Tensor, label_fn: Callable[[Tensor], Tensor],
                      interventions: Any = None) -> Tensor:  # -> [n_features]
    """Mean ``(ŷ_k − y_k)²`` on the inputs where only feature k is active."""
    n, per, _ = x.shape
    flat = x.reshape(n * per, n)
    with torch.no_grad():
        out, _ = run(model, flat, interventions)
    err = (out - label_fn(flat)).pow(2).reshape(n, per, n)
    idx = torch.arange(n)
    return err[idx, :, idx].mean(-1)


def unlearning_table(model: nn.Module, dec: Decomposition, ci: Tensor, path: str, feature: int,
                     label_fn: Callable[[Tensor], Tensor], zero_site: Site, per_feature: int = 256,
                     seed: int = 0) -> dict[str, Any]:
    """Ablate what ``feature`` needs at ``path``; compare errors with the original model and
    with ``zero_site`` zero-ablated (the level of a model that lacks the computation)."""
    cols = feature_subcomponents(ci, feature)
    edited = ablate_weights(model, dec, {path: cols})
    x = single_feature_inputs(ci.shape[0], per_feature, torch.Generator().manual_seed(seed))
    base = per_feature_error(model, x, label_fn)
    ablated = per_feature_error(edited, x, label_fn)
    zeroed = per_feature_error(model, x, label_fn, [(zero_site, Zero())])
    others = torch.ones(ci.shape[0], dtype=torch.bool)
    others[feature] = False
    span = float(zeroed[feature] - base[feature])
    lost = float(ablated[feature] - base[feature]) / span if abs(span) > 1e-12 else float("nan")
    ratio = float(ablated[others].mean() / base[others].mean())
    rows = [{"features": f"feature {feature} (ablated)", "unablated": float(base[feature]),
             "ablated": float(ablated[feature]), "mlp_zero_ablated": float(zeroed[feature])},
            {"features": f"other {int(others.sum())} (mean)", "unablated": float(base[others].mean()),
             "ablated": float(ablated[others].mean()), "mlp_zero_ablated": float(zeroed[others].mean())}]
    return {"feature": feature, "subcomponents": cols, "lost_fraction": lost, "others_ratio": ratio,
            "others_worst_ratio": float((ablated[others] / base[others]).max()), "rows": rows,
            "per_feature": {"unablated": base.tolist(), "ablated": ablated.tolist(), "zero": zeroed.tolist()}}
