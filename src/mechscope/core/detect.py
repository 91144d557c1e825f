"""Finding a transformer's parts from the module tree: the heuristics behind
:func:`mechscope.core.structure.structure`.

Evidence is structural first (identical blocks in a ``ModuleList``; an attention module
holds q/k/v or fused qkv projections; an MLP holds a projection back to d_model), then
weight shapes, the config's numbers (checked against the weights), the order in which the
probe forward ran the modules, and attribute names as a tie-break. A model's *name* is
never consulted. Each function returns ``None`` for what it cannot find; the structure
layer turns that into an error naming the override.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor, nn

from mechscope.core.site import SiteError
from mechscope.core.trace import Output


class StructureError(SiteError):
    """Part of a model's structure could not be found or does not add up."""


NORMS = tuple(getattr(nn, n) for n in ("LayerNorm", "RMSNorm", "GroupNorm") if hasattr(nn, n))  # RMSNorm: torch >= 2.4

QKV = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", "wq", "wk", "wv", "q_lin", "k_lin",
        "v_lin", "c_attn", "query_key_value", "qkv", "qkv_proj", "wqkv", "in_proj", "w_qkv"}
Q_NAMES = {"q_proj", "query", "q", "wq", "q_lin"}
V_NAMES = {"v_proj", "value", "v", "wv", "v_lin"}
K_NAMES = {"k_proj", "key", "k", "wk", "k_lin"}
FUSED = {"c_attn", "query_key_value", "qkv", "qkv_proj", "wqkv", "in_proj", "w_qkv"}
OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin", "proj", "o", "output", "out")
DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2", "wo", "out_proj", "proj_out", "fc_2")
ATTN_NAMES = {"attn", "self_attn", "attention", "self_attention", "attn_layer", "mha"}
MLP_NAMES = {"mlp", "feed_forward", "ffn", "ff", "feedforward", "mlp_block", "moe", "block_sparse_moe"}


def is_conv1d(m: nn.Module | None) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape [in, out] (``nf`` = out)."""
    w, nf = getattr(m, "weight", None), getattr(m, "nf", None)
    return isinstance(w, Tensor) and w.dim() == 2 and isinstance(nf, int) and w.shape[1] == nf


def linear_shape(m: nn.Module | None) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear map module: nn.Linear or HF's Conv1D (``x @ W``)."""
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return (int(m.weight.shape[0]), int(m.nf)) if is_conv1d(m) else None


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORMS) or "norm" in type(m).__name__.lower()


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # noqa: BLE001 - an odd config still has its top-level numbers
            return cfg
    return cfg


def cfg_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None) if cfg is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attr_int(m: nn.Module | None, *names: str) -> int | None:
    for name in names:
        value = getattr(m, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def pick(paths: list[str], preferred: tuple[str, ...], order: Mapping[str, int]) -> str | None:
    """One of ``paths``: by preferred leaf name, else the one run last (or registered last)."""
    if not paths:
        return None
    for name in preferred:
        named = [p for p in paths if leaf(p).lower() == name]
        if len(named) == 1:
            return named[0]
    return max(paths, key=lambda p: (order.get(p, -1), paths.index(p)))


def outside(path: str, block_paths: list[str]) -> bool:
    return not any(path == b or path.startswith(b + ".") for b in block_paths)


def path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((p for p, m in model.named_modules() if m is target), None)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            return emb
    return None


def find_blocks(model: nn.Module, n_layers: int | None, order: Mapping[str, int]) -> str | None:
    """The ModuleList of identical composite blocks that the forward runs through.

    Among candidates, prefer the one whose length is the config's layer count, whose
    first block ran in the probe, and which holds the most parameters (a list of MoE
    experts inside each block holds fewer than the block list itself).
    """
    found = []
    for path, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        kids = list(m.named_children())
        if len({type(k) for _, k in kids}) != 1 or not any(True for _ in kids[0][1].children()):
            continue
        ran = not order or join(path, kids[0][0]) in order
        size = sum(p.numel() for p in m.parameters())
        found.append(((n_layers is None or len(kids) == n_layers), ran, size, -path.count("."), path))
    return max(found)[-1] if found else None


def d_model(model: nn.Module, cfg: Any, block_paths: list[str], outputs: Mapping[str, Output]) -> int | None:
    """Width of the residual stream: what a block returns, else the config, else the embedding."""
    if block_paths and block_paths[0] in outputs and outputs[block_paths[0]].width:
        return outputs[block_paths[0]].width
    from_cfg = cfg_int(cfg, "hidden_size", "n_embd", "d_model")
    if from_cfg:
        return from_cfg
    emb = input_embeddings(model)
    return getattr(emb, "embedding_dim", None)


def has_qkv(m: nn.Module) -> bool:
    return hasattr(m, "in_proj_weight") or any(leaf(n).lower() in QKV for n, _ in m.named_modules() if n)


def find_attn(block: nn.Module) -> str | None:
    """The shallowest submodule with attention evidence (q/k/v projections; name or class)."""
    return find_part(block, has_qkv, ATTN_NAMES, r"attn|attention", None)


def find_mlp(block: nn.Module, attn: str | None, d_model: int | None) -> str | None:
    """The shallowest non-attention submodule with MLP evidence (a d_mlp -> d_model projection)."""
    evidence = lambda m: any(is_down(s, d_model) for s in m.modules())  # noqa: E731
    return find_part(block, evidence, MLP_NAMES, r"mlp|feedforward|feed_forward|ffn|moe", attn)


def find_part(block: nn.Module, evidence: Any, names: set[str], class_re: str, avoid: str | None) -> str | None:
    """The shallowest submodule scoring >= 2: structural evidence counts 2, its attribute
    name and its class name 1 each. Linears, norms and anything overlapping ``avoid``
    (the attention, when looking for the MLP) are not candidates."""
    best = None
    for rel, m in block.named_modules():
        if not rel or linear_shape(m) or is_norm(m):
            continue
        if avoid and (rel == avoid or rel.startswith(avoid + ".") or avoid.startswith(rel + ".")):
            continue
        score = 2 * bool(evidence(m)) + (leaf(rel).lower() in names) + bool(re.search(class_re, type(m).__name__.lower()))
        key = (-rel.count("."), score)
        if score >= 2 and (best is None or key > best[0]):
            best = (key, rel)
    return best[1] if best else None


def is_down(m: nn.Module, d_model: int | None) -> bool:
    shape = linear_shape(m)
    return bool(shape) and (d_model is None or (shape[1] == d_model and shape[0] != d_model))


def find_proj(block: nn.Module, rel: str, d_model: int | None, names: tuple[str, ...], block_path: str,
               order: Mapping[str, int], down: bool, skip: str | None = None) -> str | None:
    """The linear inside ``rel`` that maps back to d_model (attention output or MLP down)."""
    root = block.get_submodule(rel) if rel else block
    if linear_shape(root) and rel:
        return rel
    found = []
    for sub, m in root.named_modules():
        path = f"{rel}.{sub}" if rel and sub else (sub or rel)
        shape = linear_shape(m)
        if not shape or not sub or (skip and (path == skip or path.startswith(skip + "."))):
            continue
        if not rel and "." in sub:  # searching the block itself: only its direct children
            continue
        if leaf(sub).lower() in QKV or (d_model is not None and shape[1] != d_model):
            continue
        if down and d_model is not None and shape[0] == d_model:
            continue
        found.append(path)
    return pick(found, names, {p: order.get(f"{block_path}.{p}", -1) for p in found})


def heads(model: nn.Module, cfg: Any, attn_path: str | None, out_path: str | None,
          over: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(n_heads, head_dim, n_kv_heads): config or module attributes, checked against weights."""
    attn = model.get_submodule(attn_path) if attn_path else None
    n = over.get("n_heads") or cfg_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads") \
        or attr_int(attn, "num_heads", "n_heads", "n_head", "num_attention_heads")
    hd = over.get("head_dim") or cfg_int(cfg, "head_dim", "d_head") \
        or attr_int(attn, "head_dim", "d_head", "head_size", "attention_head_size")
    out = model.get_submodule(out_path) if out_path else None
    width = linear_shape(out)[0] if linear_shape(out) else None
    if width is not None:
        if n and hd and n * hd != width:
            raise StructureError(
                f"n_heads={n} x head_dim={hd} = {n * hd}, but the attention output projection "
                f"{out_path!r} takes {width} features; pass the right numbers with "
                "structure(model, n_heads=..., head_dim=...) or the projection with attn_out_proj=")
        if n and not hd and width % n == 0:
            hd = width // n
        elif hd and not n and width % hd == 0:
            n = width // hd
    kv = over.get("n_kv_heads") or (kv_from_weights(attn, n, hd) if attn is not None else None) \
        or cfg_int(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or n
    return n, hd, kv


def kv_from_weights(attn: nn.Module, n: int | None, hd: int | None) -> int | None:
    """Key/value heads from the key (or fused qkv) projection's width: the weights decide GQA."""
    if not hd:
        return None
    w = getattr(attn, "in_proj_weight", None)
    if isinstance(w, Tensor) and n:
        return (w.shape[0] - n * hd) // (2 * hd) or None
    for rel, m in attn.named_modules():
        shape, name = linear_shape(m), leaf(rel).lower()
        if shape and name in K_NAMES and shape[1] % hd == 0:
            return shape[1] // hd
        if shape and name in FUSED and n and (shape[1] - n * hd) > 0 and (shape[1] - n * hd) % (2 * hd) == 0:
            return (shape[1] - n * hd) // (2 * hd)
    return None


def find_qkv(model: nn.Module, attn: str | None, d_model: int | None, n: int | None, hd: int | None,
             kv: int | None) -> tuple[str, str, str] | None:
    """Separate query, key and value projections of the attention at ``attn`` (full paths),
    each a linear from d_model to its heads' width; None for fused or unknown layouts."""
    if attn is None or not (d_model and n and hd and kv):
        return None
    found = []
    for names, width in ((Q_NAMES, n * hd), (K_NAMES, kv * hd), (V_NAMES, kv * hd)):
        hits = [rel for rel, m in model.get_submodule(attn).named_children()
                if rel.lower() in names and linear_shape(m) == (d_model, width)]
        if len(hits) != 1:
            return None
        found.append(f"{attn}.{hits[0]}")
    return tuple(found)


def find_embed(model: nn.Module, block_paths: list[str]) -> str | None:
    """``get_input_embeddings()`` by identity; else the token-id embedding outside the blocks."""
    path = path_of(model, input_embeddings(model))
    if path is not None:
        return path
    embs = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Embedding) and outside(p, block_paths)]
    if len(embs) > 1:  # positional tables say so in their name; token tables are what remains
        tokens = [(p, m) for p, m in embs if not re.search(r"pos|wpe", leaf(p).lower())]
        embs = tokens or embs
    return embs[0][0] if embs else None


def find_unembed(model: nn.Module, block_paths: list[str], d_model: int | None, order: Mapping[str, int]) -> str | None:
    """``get_output_embeddings()`` by identity; else the last linear from d_model outside the blocks."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            path = path_of(model, get())
        except (NotImplementedError, AttributeError):
            path = None
        if path is not None:
            return path
    if not block_paths:  # an unembedding reads the residual stream after the blocks
        return None
    lins = [p for p, m in model.named_modules() if p and linear_shape(m) and outside(p, block_paths)
            and (d_model is None or linear_shape(m)[0] == d_model)]
    after = [p for p in lins if not order or order.get(p, -1) > order.get(block_paths[-1], -1)]
    return pick(after, ("lm_head", "unembed", "head", "w_u"), order)


def find_final_norm(model: nn.Module, block_paths: list[str], order: Mapping[str, int], unembed: str | None) -> str | None:
    """The norm outside the blocks that runs after the last block (and before the unembedding)."""
    if not block_paths:
        return None
    norms = [p for p, m in model.named_modules() if p and is_norm(m) and outside(p, block_paths)]
    if order:
        last, stop = order.get(block_paths[-1], -1), order.get(unembed, len(order)) if unembed else len(order)
        norms = [p for p in norms if last < order.get(p, -1) < stop]
        return min(norms, key=lambda p: order[p]) if norms else None
    names = [p for p, _ in model.named_modules()]
    after = [p for p in norms if names.index(p) > names.index(block_paths[-1])]
    return after[0] if after else None

