"""Figures of a decomposition, drawn into matplotlib ``Figure`` objects given by the caller.

- :func:`draw_importance_matrix`: the importance matrix (inputs × alive subcomponents,
  columns in the Hungarian order), one panel per layer;
- :func:`draw_norms`: ``‖U_c V_c‖`` per subcomponent, sorted, one panel per layer, with
  the live threshold;
- :func:`draw_vs_features`: every subcomponent against the target's mechanisms — the
  cosine matrix (mechanisms × live subcomponents) and, for a 2-D hidden space (TMS 5-2),
  the target's feature directions ``W[:, j]`` beside each matched subcomponent's
  ``U_c V_c[:, j]``.

The functions take a figure (``mechscope.report.figures.new_figure()`` or the bench's
``ctx.figure``) so that they never touch pyplot's global state.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mechscope.spd.evals import LIVE_REL


def draw_importance_matrix(fig: Any, matrices: Mapping[str, Tensor], title: str = "") -> None:
    """Heatmaps of ``{layer: [n_inputs, k]}`` importance matrices (values in [0, 1])."""
    axes = fig.subplots(1, max(len(matrices), 1), squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, matrices.items()):
        im = ax.imshow(m.detach().double().numpy(), vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto",
                       interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("subcomponent (matched order)", fontsize=8)
        ax.set_ylabel("input feature", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="causal importance")
    if title:
        fig.suptitle(title, fontsize=10)


def draw_norms(fig: Any, norms: Mapping[str, Tensor], rel: float = LIVE_REL) -> None:
    """Sorted subcomponent norms per layer, log scale, with the live threshold."""
    axes = fig.subplots(1, max(len(norms), 1), squeeze=False)[0]
    for ax, (name, n) in zip(axes, norms.items()):
        values = torch.sort(n.detach().double(), descending=True).values.numpy()
        ax.bar(range(len(values)), values, color="#4a7")
        ax.axhline(rel * values.max(), color="#c44", lw=1, ls="--", label=f"live: ≥ {rel:g} × max")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("subcomponent (sorted)")
        ax.set_ylabel("‖U_c V_c‖")
        ax.legend(fontsize=7)


def draw_vs_features(fig: Any, cos: Tensor, live: Tensor, W: Tensor | None = None,
                     sub_weights: Tensor | None = None, match: list[int] | None = None) -> None:
    """Cosine of every live subcomponent with every target mechanism; for a 2-D hidden
    space also the feature directions ``W[:, j]`` and the matched subcomponents' columns."""
    two_d = W is not None and sub_weights is not None and match is not None and W.shape[0] == 2
    axes = fig.subplots(1, 2 if two_d else 1, squeeze=False)[0]
    cols = torch.nonzero(live).flatten().tolist()
    if match is not None:  # matched subcomponents first, in feature order: a diagonal when SPD works
        first = [c for c in dict.fromkeys(match) if c in cols]
        cols = first + [c for c in cols if c not in first]
    c = cos[:, cols].double().numpy()
    im = axes[0].imshow(c, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto", interpolation="nearest")
    axes[0].set_xticks(range(len(cols)), [str(i) for i in cols], fontsize=6)
    axes[0].set_xlabel("live subcomponent")
    axes[0].set_ylabel("target mechanism (feature)")
    axes[0].set_title("cos(U_c V_c, W_j e_jᵀ)", fontsize=9)
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    if two_d:
        ax = axes[1]
        w = W.detach().double()
        for j in range(w.shape[1]):
            ax.annotate("", xy=(float(w[0, j]), float(w[1, j])), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color="#888", lw=2.5))
            s = sub_weights[match[j]].detach().double()[:, j]  # the matched subcomponent's column j
            ax.annotate("", xy=(float(s[0]), float(s[1])), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color="#c44", lw=1))
            ax.text(float(w[0, j]) * 1.08, float(w[1, j]) * 1.08, str(j), fontsize=8)
        lim = float(w.abs().max()) * 1.3
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title("W[:, j] grey, matched (U_c V_c)[:, j] red", fontsize=8)
