"""Everything measured about a decomposition of a built-in target, in one dictionary.

Used by the bench checks, ``mechscope spd eval`` and ``mechscope spd figures``:

- live subcomponents per layer (norm ≥ 10 % of the layer's largest);
- importances on one-hot inputs (each feature alone at 0.75), the Hungarian-matched
  identity report (violations of diagonal ≥ 0.9 / off-diagonal ≤ 0.1) for layers with one
  mechanism per feature, and the dense report for layers whose mechanism every input uses
  (the +ID identity, the residual MLP's ``W_out``);
- for TMS, MMCS and ML2R of the encoder's subcomponents against ``W[:, j] e_jᵀ``;
- reconstruction losses under importance, stochastic, no and zero masks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mechscope.spd.decomposition import Decomposition
from mechscope.spd.evals import (
    dense_report,
    identity_report,
    importance_matrix,
    live_counts,
    live_mask,
    mmcs_ml2r,
    reconstruction_losses,
    tms_mechanisms,
)
from mechscope.spd.figures import draw_importance_matrix, draw_norms, draw_vs_features
from mechscope.tasks.spd_targets import data_fn, target

ONE_HOT_VALUE = 0.75


def layer_roles(name: str, model: nn.Module) -> dict[str, tuple[str, int]]:
    """``{path: ("identity" | "dense", k)}``: what structure each decomposed layer should show."""
    t = target(name)
    if name == "resid_mlp":
        return {"mlp_in": ("identity", t.n_features), "mlp_out": ("dense", model.cfg.d_mlp)}
    roles = {"encoder": ("identity", t.n_features), "decoder": ("identity", t.n_features)}
    if t.identity_site:
        roles[t.identity_site] = ("dense", model.n_hidden)
    return roles


def assess(name: str, model: nn.Module, dec: Decomposition, seed: int = 0, n_recon: int = 4096) -> dict[str, Any]:
    """All measures of ``dec`` (a decomposition of built-in target ``name``)."""
    t = target(name)
    one_hot = torch.eye(t.n_features) * ONE_HOT_VALUE
    ci = importance_matrix(model, dec, one_hot)  # {path: [n_features, C]}
    out: dict[str, Any] = {"target": name, "live": {p: n for p, (n, _) in live_counts(dec).items()},
                           "norms": {p: v.tolist() for p, v in dec.subcomponent_norms().items()}, "layers": {}}
    matrices = {}
    for path, (role, k) in layer_roles(name, model).items():
        report = identity_report(ci[path]) if role == "identity" else dense_report(ci[path], k)
        matrices[path] = report.pop("matrix")
        out["layers"][path] = {"role": role, "k": k, **report}
    out["_matrices"] = matrices  # tensors for the figures (dropped from JSON output)
    if name != "resid_mlp":
        mm = mmcs_ml2r(dec, "encoder", tms_mechanisms(model.encoder.weight.detach()))
        out["_cos"] = mm.pop("cos_matrix")
        out["encoder_match"] = mm
    x = data_fn(name)(n_recon, torch.Generator().manual_seed(seed + 17))
    out["reconstruction"] = reconstruction_losses(model, dec, x, seed=seed)
    return out


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of :func:`assess`'s result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def draw(result: dict[str, Any], model: nn.Module, dec: Decomposition,
         figure: Callable[[str, str], Any]) -> None:
    """Draw the three figures; ``figure(name, caption, **figure_kwargs)`` is a context manager
    yielding a Figure (the bench's ``ctx.figure``)."""
    name = result["target"]
    wide = (3.4 * len(result["_matrices"]) + 1.0, 3.6)
    with figure("importance_matrix", f"{name}: causal importance on one-hot inputs (value {ONE_HOT_VALUE}), "
                "alive subcomponents in Hungarian order", figsize=wide) as fig:
        draw_importance_matrix(fig, result["_matrices"])
    with figure("subcomponent_norms", f"{name}: ‖U_c V_c‖ per subcomponent, sorted (dashed: live threshold)",
                figsize=wide) as fig:
        draw_norms(fig, dec.subcomponent_norms())
    if "_cos" in result:
        norms = dec.subcomponent_norms()["encoder"]
        with figure("subcomponents_vs_features", f"{name}: encoder subcomponents against the target's "
                    "feature mechanisms W[:, j] e_jᵀ", figsize=(9.0, 3.8)) as fig:
            draw_vs_features(fig, result["_cos"], live_mask(norms), model.encoder.weight.detach(),
                             dec.comps("encoder").subcomponent_weights().detach(), result["encoder_match"]["match"])
