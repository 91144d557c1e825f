"""Weight-based circuit readings of Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits": per-head QK and OV circuits and Q/K/V-composition scores.

Convention: activations are *row* vectors and weights act as ``x @ W`` (as ``nn.Linear``
computes ``x @ weight.T``). Per head, ``W_Q W_K W_V`` are ``[d_model, d_head]`` and ``W_O``
``[d_head, d_model]``; the QK circuit ``W_QK = W_Q @ W_K^T`` gives the (unscaled) score of a
query residual on a key residual, ``x_q @ W_QK @ x_k^T``, and the OV circuit ``W_OV = W_V @ W_O``
what a head moves from the position it attends to, ``x @ W_OV``.

The paper writes column vectors (``W^col = (W^row)^T``; its ``W_OV = W_O W_V``). In rows,
with ``W_OV^A`` of an earlier head A and the later head B, an output ``x @ W_OV^A`` feeds

- B's query (Q-composition): score ``(x W_OV^A) W_QK^B x_k^T`` -> ``M = W_OV^A @ W_QK^B``;
- B's key (K-composition): score ``x_q W_QK^B (x W_OV^A)^T`` -> ``M = W_OV^A @ (W_QK^B)^T``;
- B's value (V-composition): ``x W_OV^A W_OV^B`` -> ``M = W_OV^A @ W_OV^B``;

and the score is ``||M||_F / (||W_OV^A||_F ||W_B||_F)``, the paper's (and TransformerLens')
definition transposed. These read the weights alone (norms, biases, rotary embeddings, q/k
norms and MLPs sit between them and the real computation: every result carries
``caveats``); compare scores with :func:`random_baseline`, never with 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.detect import is_conv1d, is_norm
from mechscope.core.structure import BlockPaths, ModelStructure, StructureError, structure

Kind = Literal["q", "k", "v"]

_ROPE_CFG = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "rotary", "rope")


@dataclass(frozen=True, eq=False)
class HeadWeights:
    """One layer's per-head weights in the ``x @ W`` convention, and what they leave out."""

    layer: int
    W_Q: Tensor  # [n_heads, d_model, d_head]
    W_K: Tensor  # [n_heads, d_model, d_head], key/value heads expanded to the query heads they serve
    W_V: Tensor  # [n_heads, d_model, d_head]
    W_O: Tensor  # [n_heads, d_head, d_model]
    rotary: bool = False  # the model rotates q and k by position (RoPE)
    qk_norm: bool = False  # the attention normalises q and/or k (q_norm / k_norm)
    biases_ignored: bool = False  # q/k/v/o have non-zero biases the weight-only circuits leave out
    pre_norm_folded: bool = False  # always False: the norm's weight is not folded into W_Q/W_K/W_V
    caveats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        h, d, r = self.W_Q.shape
        bad = {k: list(w.shape) for k, w, want in (("W_K", self.W_K, (h, d, r)), ("W_V", self.W_V, (h, d, r)),
                                                    ("W_O", self.W_O, (h, r, d))) if tuple(w.shape) != want}
        if bad:
            raise ValueError(f"W_Q is [n_heads, d_model, d_head] = {[h, d, r]}, so W_K and W_V must be {[h, d, r]} "
                             f"and W_O [n_heads, d_head, d_model] = {[h, r, d]}; got {bad}")


@dataclass(frozen=True, eq=False)
class CompositionScores:
    """``scores[layer_A, head_A, layer_B, head_B]``; NaN where ``layer_B <= layer_A``."""

    scores: Tensor  # [n_layers, n_heads, n_layers, n_heads]
    kind: str
    caveats: tuple[str, ...]


# ------------------------------------------------------------------------------ pure math


def qk_circuit(W_Q: Tensor, W_K: Tensor) -> Tensor:  # [..., d_model, d_head] x2 -> [..., d_model, d_model]
    """``W_Q @ W_K^T``: the bilinear form of the (unscaled, bias-free) attention score."""
    return W_Q @ W_K.transpose(-1, -2)


def ov_circuit(W_V: Tensor, W_O: Tensor) -> Tensor:  # [..., d_model, d_head], [..., d_head, d_model] -> [..., d_model, d_model]
    """``W_V @ W_O``: what a head writes, per unit of attention, given the attended residual."""
    return W_V @ W_O


def composition_score(W_A: Tensor, W_B: Tensor) -> Tensor:  # [..., d, d] x2 -> [...]
    """``||W_A @ W_B||_F / (||W_A||_F ||W_B||_F)`` on dense matrices (broadcasting); ``W_A`` is
    the earlier head's OV circuit, ``W_B`` the later head's matrix as in the module docstring."""
    norm = torch.linalg.matrix_norm
    return norm(W_A @ W_B) / (norm(W_A) * norm(W_B))


def factored_composition(a_in: Tensor, a_out: Tensor, b_in: Tensor, b_out: Tensor) -> Tensor:
    """:func:`composition_score` of ``W_A = a_in @ a_out`` and ``W_B = b_in @ b_out`` without
    forming a d_model x d_model matrix, from d_head x d_head Gram matrices only, which is
    what makes a 4096-wide model affordable: ``||P M S||_F^2 = tr(M^T (P^T P) M (S S^T))``.

    ``a_in`` [..., d_model, r], ``a_out`` [..., r, d_model], ``b_in`` [..., d_model, s],
    ``b_out`` [..., s, d_model], leading dims broadcast (``[n_a, 1]`` against ``[1, n_b]``
    gives every pair) -> [...]; NaN where a head's weights are all zero.
    """
    g_a = a_in.mT @ a_in  # [..., r, r]
    g_b = b_out @ b_out.mT  # [..., s, s]
    m = a_out @ b_in  # [..., r, s]: the core of W_A @ W_B
    num = ((g_a @ m @ g_b) * m).sum((-1, -2))  # ||W_A W_B||_F^2
    norm_a = (g_a * (a_out @ a_out.mT)).sum((-1, -2))  # ||W_A||_F^2
    norm_b = ((b_in.mT @ b_in) * g_b).sum((-1, -2))  # ||W_B||_F^2
    # the square is >= 0 in exact arithmetic; rounding can leave a tiny negative
    return (num.clamp_min(0) / (norm_a * norm_b)).sqrt()


def _later_factors(hw: HeadWeights, kind: str) -> tuple[Tensor, Tensor]:  # [n_heads, d_model, r], [n_heads, r, d_model]
    """The later head's matrix of the module docstring, as a product of two thin factors."""
    factors = {"q": (hw.W_Q, hw.W_K.mT), "k": (hw.W_K, hw.W_Q.mT), "v": (hw.W_V, hw.W_O)}  # W_QK, W_QK^T, W_OV
    if kind not in factors:
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
    return factors[kind]


def random_baseline(shape_A: tuple[int, int], shape_B: tuple[int, int], n: int = 1000,
                    generator: torch.Generator | None = None) -> Tensor:  # -> [n]
    """The composition score between random matrices of the same shapes and ranks: ``W_A``
    a product of Gaussian ``[d_model, d_head_A] @ [d_head_A, d_model]``, ``W_B`` likewise
    with ``shape_B = (d_model, d_head_B)`` (the same for Q, K and V composition: every
    factor is Gaussian). Unrelated heads score far from 0, so a score means something only
    above this distribution's upper tail (e.g. ``torch.quantile(baseline, 0.99)``)."""
    (d, r), (d_b, s) = shape_A, shape_B
    if d != d_b:
        raise ValueError(f"shape_A and shape_B must share d_model, got {shape_A} and {shape_B}")
    g = lambda *shape: torch.randn(n, *shape, generator=generator, dtype=torch.float64)  # noqa: E731
    # sample i is paired with sample i only: n independent draws, not n^2 correlated ones
    return factored_composition(g(d, r), g(r, d), g(d, s), g(s, d)).float()


# ------------------------------------------------------------------------------ reading a model


def head_weights(model: nn.Module, layer: int) -> HeadWeights:
    """Per-head ``W_Q W_K W_V W_O`` of block ``layer`` (found by :func:`structure`), with flags
    and caveats saying what a weight-only reading of this model leaves out.

    Reads the zoo transformer (``q k v o``), separate ``q_proj k_proj v_proj`` linears
    (Llama, Mistral, Qwen, Gemma, OLMo 2), Phi-3's fused ``qkv_proj`` (rows ``[q; k; v]``)
    and GPT-2's ``c_attn`` Conv1D (columns ``q | k | v``). Grouped-query key/value heads are
    repeated so query head ``h`` gets key/value head ``h // (n_heads // n_kv_heads)``.
    Anything else raises :class:`StructureError`; build :class:`HeadWeights` yourself then.
    """
    st = structure(model)
    block = st.block(layer)
    n, hd, d = st.n_heads, st.head_dim, st.d_model
    kv = st.n_kv_heads or n
    if block.attn is None or block.attn_out_proj is None or not (n and hd and d):
        raise StructureError(
            f"{st.model_class} block {block.path!r}: found attention {block.attn!r}, output projection "
            f"{block.attn_out_proj!r}, n_heads={n}, head_dim={hd}, d_model={d}; all are needed to read head weights. "
            "Pass them with structure(model, attn=..., attn_out_proj=..., n_heads=..., head_dim=...), or build "
            "HeadWeights yourself for the pure functions (qk_circuit, ov_circuit, composition_scores)")
    if n % kv:
        raise StructureError(f"{st.model_class}: n_heads={n} is not a multiple of n_kv_heads={kv}")
    attn = model.get_submodule(block.attn)
    (w_q, w_k, w_v), biases = _qkv(attn, block.attn, n, kv, hd, d)
    w_o, b_o = _out_proj(model.get_submodule(block.attn_out_proj), block.attn_out_proj, n, hd, d)
    split = lambda w, heads: w.detach().reshape(d, heads, hd).permute(1, 0, 2).clone()  # noqa: E731  [d, heads*hd] -> [heads, d, hd]
    flags = dict(rotary=_uses_rotary(model), qk_norm=any(is_norm(m) for p, m in attn.named_modules() if p),
                 biases_ignored=any(b is not None and bool(b.detach().abs().max() > 0) for b in (*biases, b_o)))
    return HeadWeights(
        layer % st.n_layers, split(w_q, n), split(w_k, kv).repeat_interleave(n // kv, 0),
        split(w_v, kv).repeat_interleave(n // kv, 0), w_o.detach().reshape(n, hd, d).clone(),
        **flags, pre_norm_folded=False, caveats=_caveats(model, st, block, **flags))


def composition_scores(source: nn.Module | Sequence[HeadWeights], kind: Kind = "k") -> CompositionScores:
    """Q-, K- or V-composition (see the module docstring) of every earlier head with every
    later head: ``scores[layer_A, head_A, layer_B, head_B]``, NaN where ``layer_B <= layer_A``
    and where a head's matrix is zero (a head that attends uniformly has no QK to compose with).

    ``source`` is a model (every block read with :func:`head_weights`) or a list of
    :class:`HeadWeights` in increasing layer order (indexed by position in the list). Compare
    the scores with :func:`random_baseline` of the same shapes: unrelated heads score well above 0.
    """
    layers, extra = (list(source), []) if not isinstance(source, nn.Module) else _read_all(source)
    if not layers or len({hw.W_Q.shape[:2] for hw in layers}) != 1:
        raise ValueError("composition_scores needs at least one HeadWeights, all with the same n_heads and d_model, "
                         f"got {[tuple(hw.W_Q.shape) for hw in layers]}")
    if any(a.layer >= b.layer for a, b in zip(layers, layers[1:])):
        raise ValueError(f"HeadWeights must be in increasing layer order, got layers {[hw.layer for hw in layers]}")
    n_layers, n_heads = len(layers), layers[0].W_Q.shape[0]
    scores = torch.full((n_layers, n_heads, n_layers, n_heads), float("nan"), device=layers[0].W_Q.device)
    # float64: the Gram-matrix route squares the weights, and float32 rounding would show
    ov = [(hw.W_V.double()[:, None], hw.W_O.double()[:, None]) for hw in layers]  # [n_heads, 1, ...]
    for b, hw in enumerate(layers):
        b_in, b_out = (w.double()[None] for w in _later_factors(hw, kind))  # [1, n_heads, ...]
        for a in range(b):
            scores[a, :, b] = factored_composition(*ov[a], b_in, b_out).float()
    caveats = tuple(dict.fromkeys([c for hw in layers for c in hw.caveats] + extra))
    return CompositionScores(scores, kind, caveats)


def _read_all(model: nn.Module) -> tuple[list[HeadWeights], list[str]]:
    """Every block's head weights, and the caveat that only the direct path is scored."""
    st = structure(model)
    mlps = ["direct path only: what MLPs do to a head's output before a later head reads it is left out"]
    # with no block list, head_weights(model, 0) raises the StructureError that says how to give one
    return [head_weights(model, i) for i in range(st.n_layers or 1)], mlps if any(b.mlp for b in st.blocks) else []


def _caveats(model: nn.Module, st: ModelStructure, block: BlockPaths, rotary: bool, qk_norm: bool,
             biases_ignored: bool) -> tuple[str, ...]:
    """What a reading of ``block``'s weights alone leaves out of its real computation."""
    out = []
    if rotary:
        out.append("rotary embeddings: the QK circuit is computed without rotation; the real attention score "
                   "depends on relative position")
    if qk_norm:
        out.append("q/k norms: the attention normalises queries and/or keys before the score, so the score is "
                   "not the bilinear form W_Q W_K^T of the residual stream (the norms' weights are left out too)")
    if biases_ignored:
        out.append("biases left out: a query bias adds a key-dependent score term, value and output biases a "
                   "constant write (a key bias only shifts all of a query's scores, which softmax ignores)")
    norms = _norms_read(model, st, block)
    if norms:
        out.append(f"norms not folded (pre_norm_folded=False): the heads read the stream through {', '.join(norms)}; "
                   "W_Q/W_K/W_V act on the normalised stream, whose scale and per-channel weights are left out")
    write, error = block.attn_write, block.writes_error
    if write is not None and not write.is_proj:
        out.append(f"the block adds {write.path!r}'s output to the stream, not the output projection's: what "
                   "W_O writes is transformed (e.g. normalised) before later heads read it")
    elif error:
        out.append(f"what the block writes for its attention is unknown ({error}); the OV circuit may not be "
                   "what the stream receives")
    return tuple(out)


def _norms_read(model: nn.Module, st: ModelStructure, block: BlockPaths) -> list[str]:
    """The block's norms that the heads read through: those that finish before the attention in
    the probe forward (OLMo 2 has none; Llama's post_attention_layernorm feeds the MLP, not the
    heads). Without that order (the probe did not run them), every norm outside the attention."""
    order = {p: i for i, p in enumerate(st.outputs)}
    at = order.get(block.attn)
    norms = [rel for rel, m in model.get_submodule(block.path).named_modules() if rel and is_norm(m)
             and not f"{block.path}.{rel}".startswith(block.attn + ".")]
    return [rel for rel in norms if at is None or order.get(f"{block.path}.{rel}", -1) < at]


def _qkv(attn: nn.Module, path: str, n: int, kv: int, hd: int, d: int) -> tuple[tuple[Tensor, ...], tuple]:
    """(q, k, v) as ``x @ W`` matrices ``[d_model, heads * d_head]`` and their biases."""
    kids = dict(attn.named_children())
    widths = (n * hd, kv * hd, kv * hd)
    for names in (("q_proj", "k_proj", "v_proj"), ("q", "k", "v")):
        mods = [kids.get(name) for name in names]
        if all(isinstance(m, nn.Linear) for m in mods) and \
                [(m.in_features, m.out_features) for m in mods] == [(d, w) for w in widths]:
            return tuple(m.weight.T for m in mods), tuple(m.bias for m in mods)
    # fused: Phi-3's qkv_proj nn.Linear (output rows [q; k; v]), GPT-2's c_attn Conv1D (x @ weight, columns q | k | v)
    fused, conv = kids.get("qkv_proj"), kids.get("c_attn")
    w, b = (fused.weight.T, fused.bias) if isinstance(fused, nn.Linear) else \
        (conv.weight, conv.bias) if is_conv1d(conv) and kv == n else (None, None)
    if w is not None and tuple(w.shape) == (d, sum(widths)):
        return tuple(w.split(widths, dim=1)), (None,) * 3 if b is None else tuple(b.split(widths))
    found = ", ".join(f"{k}: {type(m).__name__}{_shape(m)}" for k, m in kids.items()) or "no submodules"
    raise StructureError(
        f"cannot read per-head W_Q/W_K/W_V from attention {path!r} ({type(attn).__name__}; found {found}) with "
        f"d_model={d}, n_heads={n}, n_kv_heads={kv}, head_dim={hd}. Readable layouts: q/k/v or q_proj/k_proj/"
        "v_proj nn.Linear, a fused qkv_proj nn.Linear with rows [q; k; v], GPT-2's c_attn Conv1D. Build "
        "HeadWeights(layer, W_Q, W_K, W_V, W_O) yourself and pass a list of them to composition_scores, or "
        "call the pure functions (qk_circuit, ov_circuit, composition_score) on your own matrices")


def _out_proj(out: nn.Module, path: str, n: int, hd: int, d: int) -> tuple[Tensor, Tensor | None]:
    """The output projection as ``x @ W`` ``[n_heads * d_head, d_model]``, and its bias."""
    if isinstance(out, nn.Linear) and (out.in_features, out.out_features) == (n * hd, d):
        return out.weight.T, out.bias
    if is_conv1d(out) and tuple(out.weight.shape) == (n * hd, d):
        return out.weight, out.bias
    raise StructureError(
        f"cannot read W_O from {path!r} ({type(out).__name__}{_shape(out)}): expected an nn.Linear or Conv1D "
        f"from n_heads*head_dim={n * hd} to d_model={d}; build HeadWeights yourself for the pure functions")


def _shape(m: nn.Module) -> str:
    return str(list(m.weight.shape)) if isinstance(getattr(m, "weight", None), Tensor) else ""


def _uses_rotary(model: nn.Module) -> bool:
    """A rotary-embedding module anywhere in the model, or rope settings in its config (HF's
    text config, or the zoo's ``cfg``): the model's own evidence, never its name."""
    if any("rotary" in type(m).__name__.lower() for m in model.modules()):
        return True
    cfg = next((c for c in (getattr(model, "config", None), getattr(model, "cfg", None)) if c is not None), None)
    get_text = getattr(cfg, "get_text_config", None)
    cfg = get_text() if callable(get_text) else cfg
    return any(getattr(cfg, name, None) not in (None, False, 0) for name in _ROPE_CFG)
