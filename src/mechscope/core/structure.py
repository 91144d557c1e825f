"""The structure of a transformer, found from the model object itself.

``structure(model)`` finds the block list, each block's attention and MLP, their output
and down projections, the embedding, final norm and unembedding, and the numbers
(d_model, n_heads, n_kv_heads, head_dim, d_mlp). It never looks at a model's *name*:
evidence comes from the module tree (identical blocks in a ``ModuleList``; an attention
module holds q/k/v or fused qkv projections; an MLP holds a projection back to d_model),
from weight shapes, from the config's numbers (checked against the weights), and from
one tiny probe forward that records what each module returns. The probe is what tells
a site whether a module returns a tensor or a tuple (transformers 5 changed this for
several blocks), and in which order modules run (which norm is the final one).

Anything that cannot be found is left ``None``; the alias that needs it then raises an
error naming the ``structure(model, ...=...)`` override that supplies it.
"""

from __future__ import annotations

import re
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor, nn

from mechscope.core.probe import Output, default_inputs, probe
from mechscope.core.site import SiteError


class StructureError(SiteError):
    """Part of a model's structure could not be found or does not add up."""


@dataclass(frozen=True)
class BlockPaths:
    """Full module paths inside one block (``None`` where the block has no such part)."""

    path: str
    attn: str | None = None  # attention module (its output holds the attention output)
    mlp: str | None = None  # MLP module (or the down projection itself when there is no MLP module)
    attn_out_proj: str | None = None  # linear n_heads*head_dim -> d_model
    mlp_down_proj: str | None = None  # linear d_mlp -> d_model


@dataclass(frozen=True)
class ModelStructure:
    """Where things are in one model, and its sizes. Build it with :func:`structure`."""

    model_class: str
    blocks_path: str | None
    blocks: tuple[BlockPaths, ...]
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_mlp: int | None = None
    embed: str | None = None
    final_norm: str | None = None
    unembed: str | None = None
    outputs: Mapping[str, Output] = field(default_factory=dict, compare=False, hash=False, repr=False)
    probe_error: str | None = field(default=None, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def block(self, layer: int) -> BlockPaths:
        """Block ``layer`` (negative counts from the end), with an error giving the range."""
        n = self.n_layers
        if n == 0:
            raise StructureError(
                f"{self.model_class} has no block list (looked for an nn.ModuleList of identical "
                "blocks with submodules); pass it explicitly: structure(model, blocks='path.to.blocks')"
            )
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise StructureError(f"layer must be an int, got {layer!r}")
        if not -n <= layer < n:
            raise StructureError(f"layer {layer} is out of range for {self.model_class} with {n} blocks; valid: 0..{n - 1} (or -{n}..-1)")
        return self.blocks[layer % n]

    def element(self, path: str) -> int | None:
        """Which element of ``path``'s output holds its activation: None (tensor) or 0 (tuple)."""
        out = self.outputs.get(path)
        if out is None:
            why = f"the probe forward failed ({self.probe_error})" if self.probe_error else "the probe forward never called it"
            raise StructureError(
                f"cannot tell whether module {path!r} returns a tensor or a tuple: {why}; give an "
                "input the model accepts with structure(model, example=..., refresh=True)"
            )
        if out.kind == "tensor":
            return None
        if out.kind == "tuple":
            return 0
        raise StructureError(f"module {path!r} returns {out.text}, neither a tensor nor a tuple starting with one")


_NORMS = tuple(getattr(nn, n) for n in ("LayerNorm", "RMSNorm", "GroupNorm") if hasattr(nn, n))  # RMSNorm: torch >= 2.4
_CACHE: "weakref.WeakKeyDictionary[nn.Module, ModelStructure]" = weakref.WeakKeyDictionary()

_QKV = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", "wq", "wk", "wv", "q_lin", "k_lin",
        "v_lin", "c_attn", "query_key_value", "qkv", "qkv_proj", "wqkv", "in_proj", "w_qkv"}
_K_NAMES = {"k_proj", "key", "k", "wk", "k_lin"}
_FUSED = {"c_attn", "query_key_value", "qkv", "qkv_proj", "wqkv", "in_proj", "w_qkv"}
_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin", "proj", "o", "output", "out")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2", "wo", "out_proj", "proj_out", "fc_2")
_ATTN_NAMES = {"attn", "self_attn", "attention", "self_attention", "attn_layer", "mha"}
_MLP_NAMES = {"mlp", "feed_forward", "ffn", "ff", "feedforward", "mlp_block", "moe", "block_sparse_moe"}


def structure(model: nn.Module, *, blocks: str | None = None, attn: str | None = None, mlp: str | None = None,
              attn_out_proj: str | None = None, mlp_down_proj: str | None = None, embed: str | None = None,
              unembed: str | None = None, final_norm: str | None = None, n_heads: int | None = None,
              head_dim: int | None = None, n_kv_heads: int | None = None, example: Any = None,
              refresh: bool = False) -> ModelStructure:
    """The structure of ``model``, cached per model object.

    Overrides replace what detection would find: ``blocks`` and ``embed``/``unembed``/
    ``final_norm`` are module paths; ``attn``, ``mlp``, ``attn_out_proj`` and
    ``mlp_down_proj`` are paths *relative to each block* (``attn_out_proj="attn.c_proj"``).
    ``example`` is an input for the probe forward (default: token ids ``[[0, 1]]``).
    A call with overrides (or ``refresh=True``) rebuilds the structure and replaces the
    cached one, so later alias look-ups on the same model use it. Call this before
    hooking the model: the probe forward would run the hooks.
    """
    given = dict(blocks=blocks, attn=attn, mlp=mlp, attn_out_proj=attn_out_proj, mlp_down_proj=mlp_down_proj,
                 embed=embed, unembed=unembed, final_norm=final_norm, n_heads=n_heads, head_dim=head_dim,
                 n_kv_heads=n_kv_heads)
    overrides = {k: v for k, v in given.items() if v is not None}
    if not isinstance(model, nn.Module):
        raise TypeError(f"structure() needs a torch.nn.Module, got {type(model).__name__}")
    if not overrides and example is None and not refresh and model in _CACHE:
        return _CACHE[model]
    found = _build(model, overrides, example)
    _CACHE[model] = found
    return found


def _build(model: nn.Module, over: dict[str, Any], example: Any) -> ModelStructure:
    for key in ("blocks", "embed", "unembed", "final_norm"):
        if key in over:
            _module(model, over[key], f"{key}=")
    width = next((_linear_shape(m)[0] for m in model.modules() if _linear_shape(m)), None)
    outputs, probe_error = probe(model, [example] if example is not None else default_inputs(model, width))
    order = {p: i for i, p in enumerate(outputs)}
    cfg = _text_config(model)
    blocks_path = over["blocks"] if "blocks" in over else _find_blocks(model, _cfg_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"), order)
    block_paths = [] if blocks_path is None else [_join(blocks_path, n) for n, _ in model.get_submodule(blocks_path).named_children()]
    d_model = _d_model(model, cfg, block_paths, outputs)
    layers = tuple(_block_parts(model, p, d_model, over, order) for p in block_paths)
    first = layers[0] if layers else BlockPaths("")
    heads = _heads(model, cfg, first, over)
    down = model.get_submodule(first.mlp_down_proj) if first.mlp_down_proj else None
    embed = over.get("embed") or _find_embed(model, block_paths)
    unembed = over.get("unembed") or _find_unembed(model, block_paths, d_model, order)
    norm = over.get("final_norm") or _find_final_norm(model, block_paths, order, unembed)
    return ModelStructure(
        model_class=type(model).__name__, blocks_path=blocks_path, blocks=layers, d_model=d_model,
        n_heads=heads[0], head_dim=heads[1], n_kv_heads=heads[2],
        d_mlp=_linear_shape(down)[0] if down is not None and _linear_shape(down) else None,
        embed=embed, final_norm=norm, unembed=unembed,
        outputs=types.MappingProxyType(dict(outputs)), probe_error=probe_error,
    )


# --------------------------------------------------------------------------- small helpers


def _module(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise StructureError(f"{what}{path!r} is not a module path of {type(model).__name__}; `mechscope sites` lists the paths") from None


def _linear_shape(m: nn.Module | None) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear map module: nn.Linear or HF's Conv1D (``x @ W``)."""
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    w, nf = getattr(m, "weight", None), getattr(m, "nf", None)
    if isinstance(w, Tensor) and w.dim() == 2 and isinstance(nf, int) and w.shape[1] == nf:
        return (int(w.shape[0]), nf)
    return None


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORMS) or "norm" in type(m).__name__.lower()


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # noqa: BLE001 - an odd config still has its top-level numbers
            return cfg
    return cfg


def _cfg_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None) if cfg is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attr_int(m: nn.Module | None, *names: str) -> int | None:
    for name in names:
        value = getattr(m, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _pick(paths: list[str], preferred: tuple[str, ...], order: Mapping[str, int]) -> str | None:
    """One of ``paths``: by preferred leaf name, else the one run last (or registered last)."""
    if not paths:
        return None
    for name in preferred:
        named = [p for p in paths if _leaf(p).lower() == name]
        if len(named) == 1:
            return named[0]
    return max(paths, key=lambda p: (order.get(p, -1), paths.index(p)))


# --------------------------------------------------------------------------- detection


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _find_blocks(model: nn.Module, n_layers: int | None, order: Mapping[str, int]) -> str | None:
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
        ran = not order or _join(path, kids[0][0]) in order
        size = sum(p.numel() for p in m.parameters())
        found.append(((n_layers is None or len(kids) == n_layers), ran, size, -path.count("."), path))
    return max(found)[-1] if found else None


def _d_model(model: nn.Module, cfg: Any, block_paths: list[str], outputs: Mapping[str, Output]) -> int | None:
    """Width of the residual stream: what a block returns, else the config, else the embedding."""
    if block_paths and block_paths[0] in outputs and outputs[block_paths[0]].width:
        return outputs[block_paths[0]].width
    from_cfg = _cfg_int(cfg, "hidden_size", "n_embd", "d_model")
    if from_cfg:
        return from_cfg
    emb = _input_embeddings(model)
    return getattr(emb, "embedding_dim", None)


def _block_parts(model: nn.Module, path: str, d_model: int | None, over: dict[str, Any], order: Mapping[str, int]) -> BlockPaths:
    block = model.get_submodule(path)
    full = lambda rel: f"{path}.{rel}" if rel else None  # noqa: E731
    for key in ("attn", "mlp", "attn_out_proj", "mlp_down_proj"):
        if key in over:
            _module(block, over[key], f"{key}= (relative to block {path!r}) ")
    attn = over.get("attn") or _find_attn(block)
    out_proj = over.get("attn_out_proj") or (_find_proj(block, attn, d_model, _OUT_NAMES, path, order, down=False) if attn else None)
    mlp = over.get("mlp") or _find_mlp(block, attn, d_model)
    down = over.get("mlp_down_proj") or (_find_proj(block, mlp, d_model, _DOWN_NAMES, path, order, down=True) if mlp else None)
    if mlp is None and down is None:  # no MLP module: the down projection sits in the block (OPT's fc2)
        down = _find_proj(block, "", d_model, _DOWN_NAMES, path, order, down=True, skip=attn)
        mlp = down
    return BlockPaths(path, full(attn), full(mlp), full(out_proj), full(down))


def _has_qkv(m: nn.Module) -> bool:
    return hasattr(m, "in_proj_weight") or any(_leaf(n).lower() in _QKV for n, _ in m.named_modules() if n)


def _find_attn(block: nn.Module) -> str | None:
    """The shallowest submodule with attention evidence (q/k/v projections; name or class)."""
    return _find_part(block, _has_qkv, _ATTN_NAMES, r"attn|attention", None)


def _find_mlp(block: nn.Module, attn: str | None, d_model: int | None) -> str | None:
    """The shallowest non-attention submodule with MLP evidence (a d_mlp -> d_model projection)."""
    evidence = lambda m: any(_is_down(s, d_model) for s in m.modules())  # noqa: E731
    return _find_part(block, evidence, _MLP_NAMES, r"mlp|feedforward|feed_forward|ffn|moe", attn)


def _find_part(block: nn.Module, evidence: Any, names: set[str], class_re: str, avoid: str | None) -> str | None:
    """The shallowest submodule scoring >= 2: structural evidence counts 2, its attribute
    name and its class name 1 each. Linears, norms and anything overlapping ``avoid``
    (the attention, when looking for the MLP) are not candidates."""
    best = None
    for rel, m in block.named_modules():
        if not rel or _linear_shape(m) or _is_norm(m):
            continue
        if avoid and (rel == avoid or rel.startswith(avoid + ".") or avoid.startswith(rel + ".")):
            continue
        score = 2 * bool(evidence(m)) + (_leaf(rel).lower() in names) + bool(re.search(class_re, type(m).__name__.lower()))
        key = (-rel.count("."), score)
        if score >= 2 and (best is None or key > best[0]):
            best = (key, rel)
    return best[1] if best else None


def _is_down(m: nn.Module, d_model: int | None) -> bool:
    shape = _linear_shape(m)
    return bool(shape) and (d_model is None or (shape[1] == d_model and shape[0] != d_model))


def _find_proj(block: nn.Module, rel: str, d_model: int | None, names: tuple[str, ...], block_path: str,
               order: Mapping[str, int], down: bool, skip: str | None = None) -> str | None:
    """The linear inside ``rel`` that maps back to d_model (attention output or MLP down)."""
    root = block.get_submodule(rel) if rel else block
    if _linear_shape(root) and rel:
        return rel
    found = []
    for sub, m in root.named_modules():
        path = f"{rel}.{sub}" if rel and sub else (sub or rel)
        shape = _linear_shape(m)
        if not shape or not sub or (skip and (path == skip or path.startswith(skip + "."))):
            continue
        if not rel and "." in sub:  # searching the block itself: only its direct children
            continue
        if _leaf(sub).lower() in _QKV or (d_model is not None and shape[1] != d_model):
            continue
        if down and d_model is not None and shape[0] == d_model:
            continue
        found.append(path)
    return _pick(found, names, {p: order.get(f"{block_path}.{p}", -1) for p in found})


def _heads(model: nn.Module, cfg: Any, first: BlockPaths, over: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(n_heads, head_dim, n_kv_heads): config or module attributes, checked against weights."""
    attn = model.get_submodule(first.attn) if first.attn else None
    n = over.get("n_heads") or _cfg_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads") \
        or _attr_int(attn, "num_heads", "n_heads", "n_head", "num_attention_heads")
    hd = over.get("head_dim") or _cfg_int(cfg, "head_dim", "d_head") \
        or _attr_int(attn, "head_dim", "d_head", "head_size", "attention_head_size")
    out = model.get_submodule(first.attn_out_proj) if first.attn_out_proj else None
    width = _linear_shape(out)[0] if _linear_shape(out) else None
    if width is not None:
        if n and hd and n * hd != width:
            raise StructureError(
                f"n_heads={n} x head_dim={hd} = {n * hd}, but the attention output projection "
                f"{first.attn_out_proj!r} takes {width} features; pass the right numbers with "
                "structure(model, n_heads=..., head_dim=...) or the projection with attn_out_proj=")
        if n and not hd and width % n == 0:
            hd = width // n
        elif hd and not n and width % hd == 0:
            n = width // hd
    kv = over.get("n_kv_heads") or (_kv_from_weights(attn, n, hd) if attn is not None else None) \
        or _cfg_int(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or n
    return n, hd, kv


def _kv_from_weights(attn: nn.Module, n: int | None, hd: int | None) -> int | None:
    """Key/value heads from the key (or fused qkv) projection's width: the weights decide GQA."""
    if not hd:
        return None
    w = getattr(attn, "in_proj_weight", None)
    if isinstance(w, Tensor) and n:
        return (w.shape[0] - n * hd) // (2 * hd) or None
    for rel, m in attn.named_modules():
        shape, leaf = _linear_shape(m), _leaf(rel).lower()
        if shape and leaf in _K_NAMES and shape[1] % hd == 0:
            return shape[1] // hd
        if shape and leaf in _FUSED and n and (shape[1] - n * hd) > 0 and (shape[1] - n * hd) % (2 * hd) == 0:
            return (shape[1] - n * hd) // (2 * hd)
    return None


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            return emb
    return None


def _outside(path: str, block_paths: list[str]) -> bool:
    return not any(path == b or path.startswith(b + ".") for b in block_paths)


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((p for p, m in model.named_modules() if m is target), None)


def _find_embed(model: nn.Module, block_paths: list[str]) -> str | None:
    """``get_input_embeddings()`` by identity; else the token-id embedding outside the blocks."""
    path = _path_of(model, _input_embeddings(model))
    if path is not None:
        return path
    embs = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Embedding) and _outside(p, block_paths)]
    if len(embs) > 1:  # positional tables say so in their name; token tables are what remains
        tokens = [(p, m) for p, m in embs if not re.search(r"pos|wpe", _leaf(p).lower())]
        embs = tokens or embs
    return embs[0][0] if embs else None


def _find_unembed(model: nn.Module, block_paths: list[str], d_model: int | None, order: Mapping[str, int]) -> str | None:
    """``get_output_embeddings()`` by identity; else the last linear from d_model outside the blocks."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            path = _path_of(model, get())
        except (NotImplementedError, AttributeError):
            path = None
        if path is not None:
            return path
    if not block_paths:  # an unembedding reads the residual stream after the blocks
        return None
    lins = [p for p, m in model.named_modules() if p and _linear_shape(m) and _outside(p, block_paths)
            and (d_model is None or _linear_shape(m)[0] == d_model)]
    after = [p for p in lins if not order or order.get(p, -1) > order.get(block_paths[-1], -1)]
    return _pick(after, ("lm_head", "unembed", "head", "w_u"), order)


def _find_final_norm(model: nn.Module, block_paths: list[str], order: Mapping[str, int], unembed: str | None) -> str | None:
    """The norm outside the blocks that runs after the last block (and before the unembedding)."""
    if not block_paths:
        return None
    norms = [p for p, m in model.named_modules() if p and _is_norm(m) and _outside(p, block_paths)]
    if order:
        last, stop = order.get(block_paths[-1], -1), order.get(unembed, len(order)) if unembed else len(order)
        norms = [p for p in norms if last < order.get(p, -1) < stop]
        return min(norms, key=lambda p: order[p]) if norms else None
    names = [p for p, _ in model.named_modules()]
    after = [p for p in norms if names.index(p) > names.index(block_paths[-1])]
    return after[0] if after else None


__all__ = ["BlockPaths", "ModelStructure", "StructureError", "structure"]
