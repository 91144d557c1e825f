"""Figures of the toy worlds, drawn into a matplotlib Figure the caller provides (the
bench's ``ctx.figure``), so nothing here opens windows or writes files."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from mechscope.tasks.tms import dimensions_per_feature, feature_norms, interference


def tms_geometry(fig: Any, W: Tensor, probs: Sequence[float], importance: Tensor) -> None:
    """One panel per instance: each feature's column W_i ∈ R² drawn from the origin,
    coloured by importance (the paper's intro figure, n = 5, m = 2, across sparsity)."""
    W = W.detach()
    k = W.shape[0]
    dstar = dimensions_per_feature(W)
    imp = (importance / importance.max()).tolist()
    for i in range(k):
        ax = fig.add_subplot(1, k, i + 1)
        for j in range(W.shape[2]):
            x, y = float(W[i, 0, j]), float(W[i, 1, j])
            colour = (1 - imp[j] * 0.8, 0.2, 0.2 + 0.6 * imp[j])
            ax.plot([0, x], [0, y], color=colour, lw=1.5)
            ax.scatter([x], [y], color=colour, s=12)
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"1-S={probs[i]:.3g}\nD*={float(dstar[i]):.2f}", fontsize=7)
    fig.set_size_inches(1.4 * k, 2.0)


def tms_norm_bars(fig: Any, W: Tensor, probs: Sequence[float], instances: Sequence[int]) -> None:
    """‖W_i‖ per feature for chosen instances, each bar coloured by its interference
    Σ_{j≠i} (Ŵ_i·W_j)² (dark: orthogonal to the others; bright: in superposition)."""
    import matplotlib


    norms, inter = feature_norms(W), interference(W)
    cmap = matplotlib.colormaps["viridis"]
    top = max(float(inter.max()), 1e-6)
    for n, i in enumerate(instances):
        ax = fig.add_subplot(1, len(instances), n + 1)
        ax.bar(range(W.shape[2]), norms[i].tolist(), color=[cmap(float(v) / top) for v in inter[i]])
        ax.set_ylim(0, 1.3)
        ax.set_title(f"1-S={probs[i]:.3g}", fontsize=8)
        ax.set_xlabel("feature")
        if n == 0:
            ax.set_ylabel("‖W_i‖ (colour: interference)")
    fig.set_size_inches(2.2 * len(instances), 2.4)


def attention_heads(fig: Any, patterns: Tensor, titles: Sequence[str]) -> None:
    """Attention patterns ``[n, q, k]`` (one example) side by side."""
    for i in range(patterns.shape[0]):
        ax = fig.add_subplot(1, patterns.shape[0], i + 1)
        ax.imshow(patterns[i].detach().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(titles[i], fontsize=8)
        ax.set_xlabel("key position")
        if i == 0:
            ax.set_ylabel("query position")
    fig.set_size_inches(3.2 * patterns.shape[0], 3.2)


def head_score_maps(fig: Any, scores: dict[str, Tensor]) -> None:
    """One heat map per score, ``[n_layers, n_heads]``, values written in."""
    for i, (name, s) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), i + 1)
        ax.imshow(s.numpy(), cmap="Greens", vmin=0, vmax=1)
        for (layer, head), v in _enumerate(s):
            ax.text(head, layer, f"{float(v):.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.set_size_inches(3.0 * len(scores), 2.2)


def _enumerate(s: Tensor):
    for layer in range(s.shape[0]):
        for head in range(s.shape[1]):
            yield (layer, head), s[layer, head]


def effect_bars(fig: Any, labels: Sequence[str], series: dict[str, Tensor], truth: Sequence[str]) -> None:
    """Per-component effects of several methods, circuit members starred."""
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for n, (name, v) in enumerate(series.items()):
        ax.bar([i + n * width for i in range(len(labels))], v.tolist(), width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{lab}*" if lab in truth else lab for lab in labels], rotation=45, fontsize=7)
    ax.set_ylabel("effect (share of clean − corrupt)")
    ax.legend(fontsize=7)
    fig.set_size_inches(max(5.0, 0.45 * len(labels)), 3.0)


def grokking_progress(fig: Any, series: dict[str, list]) -> None:
    """The progress measures over training on log axes, with the phase boundaries marked."""
    steps = series["step"]
    panels = [("loss", ["train_loss", "test_loss", "restricted_loss", "excluded_loss"], True),
              ("Gini of Fourier norms", ["gini_embed", "gini_neuron_to_logit"], False),
              ("total squared weights", ["total_squared_weights"], False),
              ("test accuracy", ["test_acc"], False)]
    for i, (title, keys, log) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            if k in series:
                ax.plot(steps, series[k], label=k, lw=1.2)
        if log:
            ax.set_yscale("log")
        for name, step in (series.get("phases") or {}).items():
            if step is not None:
                ax.axvline(step, color="grey", ls="--", lw=0.8)
                if i == 0:
                    ax.text(step, ax.get_ylim()[1], name, rotation=90, va="top", fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.set_size_inches(14, 3.2)


def fourier_norms(fig: Any, norms: Tensor, title: str) -> None:
    """Norms of the Fourier components (const, cos 1, sin 1, ...) of a weight matrix."""
    ax = fig.add_subplot()
    ax.bar(range(norms.numel()), norms.tolist(), color="#4a7")
    ax.set_xlabel("Fourier component (0: const, 2k-1: cos k, 2k: sin k)")
    ax.set_ylabel("norm")
    ax.set_title(title, fontsize=9)
    fig.set_size_inches(8, 2.6)
