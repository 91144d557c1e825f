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

import dataclasses
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from mechscope.core import detect
from mechscope.core.detect import StructureError
from mechscope.core.trace import Output, Trace, default_inputs, probe
from mechscope.core.writes import Write, embedding_writes, establish


@dataclass(frozen=True)
class BlockPaths:
    """Full module paths inside one block (``None`` where the block has no such part)."""

    path: str
    attn: str | None = None  # attention module (its output holds the attention output)
    mlp: str | None = None  # MLP module (or the down projection itself when there is no MLP module)
    attn_out_proj: str | None = None  # linear n_heads*head_dim -> d_model
    mlp_down_proj: str | None = None  # linear d_mlp -> d_model
    attn_write: Write | None = None  # what the block adds to the stream for its attention (checked)
    mlp_write: Write | None = None  # ... and for its MLP
    writes_error: str | None = None  # why the writes are unknown (then both are None)
    qkv: tuple[str, str, str] | None = None  # separate query, key and value projections (per-head inputs)
    pattern: str | None = None  # module whose output holds the attention pattern [batch, heads, q, k]
    pattern_element: int | None = None  # ... as this element of a tuple output (HF attention: 1)

    def writes(self) -> tuple[Write, ...]:
        """The checked writes of this block, or a StructureError saying why they are unknown."""
        if self.writes_error is not None:
            raise StructureError(
                f"what block {self.path!r} adds to the residual stream could not be established: "
                f"{self.writes_error}; pass the modules whose outputs the block adds with "
                "structure(model, attn_write='...', mlp_write='...') (paths relative to the block)")
        return tuple(w for w in (self.attn_write, self.mlp_write) if w is not None)


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
    # embedding modules whose outputs (summed, times one constant) are the stream before
    # block 0, checked on the probe forward; None where something else sits in between
    embed_writes: tuple[str, ...] | None = None
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


_CACHE: "weakref.WeakKeyDictionary[nn.Module, ModelStructure]" = weakref.WeakKeyDictionary()
_OVERRIDES: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def structure(model: nn.Module, *, blocks: str | None = None, attn: str | None = None, mlp: str | None = None,
              attn_out_proj: str | None = None, mlp_down_proj: str | None = None, embed: str | None = None,
              unembed: str | None = None, final_norm: str | None = None, n_heads: int | None = None,
              head_dim: int | None = None, n_kv_heads: int | None = None, attn_write: str | None = None,
              mlp_write: str | None = None, example: Any = None, refresh: bool = False) -> ModelStructure:
    """The structure of ``model``, cached per model object.

    Overrides replace what detection would find: ``blocks`` and ``embed``/``unembed``/
    ``final_norm`` are module paths; ``attn``, ``mlp``, ``attn_out_proj`` and
    ``mlp_down_proj`` are paths *relative to each block* (``attn_out_proj="attn.c_proj"``),
    and so are ``attn_write`` / ``mlp_write``, the modules whose outputs the block adds to
    the residual stream (found and checked by :mod:`mechscope.core.writes`; an override
    is checked the same way and refused when the sum does not hold).
    ``example`` is an input for the probe forward (default: token ids ``[[0, 1]]``).
    A call with overrides (or ``refresh=True``) rebuilds the structure and replaces the
    cached one, so later alias look-ups on the same model use it. The overrides stay with
    the model: a later rebuild (another ``example``, ``refresh=True``, a tool probing with
    its own input) applies them again, and only new overrides replace them. Call this
    before hooking the model: the probe forward would run the hooks.
    """
    given = dict(blocks=blocks, attn=attn, mlp=mlp, attn_out_proj=attn_out_proj, mlp_down_proj=mlp_down_proj,
                 embed=embed, unembed=unembed, final_norm=final_norm, n_heads=n_heads, head_dim=head_dim,
                 n_kv_heads=n_kv_heads, attn_write=attn_write, mlp_write=mlp_write)
    overrides = {k: v for k, v in given.items() if v is not None}
    if not isinstance(model, nn.Module):
        raise TypeError(f"structure() needs a torch.nn.Module, got {type(model).__name__}")
    if not overrides and example is None and not refresh and model in _CACHE:
        return _CACHE[model]
    if overrides:
        _OVERRIDES[model] = overrides
    found = _build(model, overrides or _OVERRIDES.get(model, {}), example)
    _CACHE[model] = found
    return found


def _build(model: nn.Module, over: dict[str, Any], example: Any) -> ModelStructure:
    for key in ("blocks", "embed", "unembed", "final_norm"):
        if key in over:
            _module(model, over[key], f"{key}=")
    width = next((detect.linear_shape(m)[0] for m in model.modules() if detect.linear_shape(m)), None)
    trace = probe(model, [example] if example is not None else default_inputs(model, width))
    outputs, probe_error = trace.outputs, trace.error
    for key in ("embed", "unembed", "final_norm"):
        _ran(trace, over.get(key), f"{key}=")
    order = {p: i for i, p in enumerate(outputs)}
    cfg = detect.text_config(model)
    blocks_path = over["blocks"] if "blocks" in over else detect.find_blocks(model, detect.cfg_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"), order)
    block_paths = [] if blocks_path is None else [detect.join(blocks_path, n) for n, _ in model.get_submodule(blocks_path).named_children()]
    d_model = detect.d_model(model, cfg, block_paths, outputs)
    layers = tuple(_checked(_block_parts(model, p, d_model, over, order, trace), trace, over) for p in block_paths)
    first = layers[0] if layers else BlockPaths("")
    heads = detect.heads(model, cfg, first.attn, first.attn_out_proj, over)
    layers = tuple(dataclasses.replace(b, qkv=detect.find_qkv(model, b.attn, d_model, *heads)) for b in layers)
    down = model.get_submodule(first.mlp_down_proj) if first.mlp_down_proj else None
    embed = over.get("embed") or detect.find_embed(model, block_paths)
    unembed = over.get("unembed") or detect.find_unembed(model, block_paths, d_model, order)
    norm = over.get("final_norm") or detect.find_final_norm(model, block_paths, order, unembed)
    return ModelStructure(
        model_class=type(model).__name__, blocks_path=blocks_path, blocks=layers, d_model=d_model,
        n_heads=heads[0], head_dim=heads[1], n_kv_heads=heads[2],
        d_mlp=detect.linear_shape(down)[0] if down is not None and detect.linear_shape(down) else None,
        embed=embed, final_norm=norm, unembed=unembed,
        embed_writes=_embed_writes(model, trace, block_paths, d_model, embed),
        outputs=types.MappingProxyType(dict(outputs)), probe_error=probe_error,
    )


# --------------------------------------------------------------------------- small helpers


def _ran(trace: Trace, path: str | None, what: str) -> None:
    """An override must name a module the forward calls (a hook on it would never fire)."""
    if path is not None and not trace.error and path not in trace.outputs:
        raise StructureError(f"{what}{path!r} names a module that never runs in the forward (the model calls "
                             "something else, or uses its weights directly), so a hook on it would never fire")


def _module(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise StructureError(f"{what}{path!r} is not a module path of {type(model).__name__}; `mechscope sites` lists the paths") from None


def _block_parts(model: nn.Module, path: str, d_model: int | None, over: dict[str, Any], order: Mapping[str, int],
                 trace: Trace) -> BlockPaths:
    block = model.get_submodule(path)
    full = lambda rel: f"{path}.{rel}" if rel else None  # noqa: E731
    for key in ("attn", "mlp", "attn_out_proj", "mlp_down_proj", "attn_write", "mlp_write"):
        if key in over:
            _module(block, over[key], f"{key}= (relative to block {path!r}) ")
    for key in ("attn", "mlp"):
        _ran(trace, f"{path}.{over[key]}" if key in over else None, f"{key}= (relative to block {path!r}) ")
    attn = over.get("attn") or detect.find_attn(block)
    out_proj = over.get("attn_out_proj") or (detect.find_proj(block, attn, d_model, detect.OUT_NAMES, path, order, down=False) if attn else None)
    mlp = over.get("mlp") or detect.find_mlp(block, attn, d_model)
    down = over.get("mlp_down_proj") or (detect.find_proj(block, mlp, d_model, detect.DOWN_NAMES, path, order, down=True) if mlp else None)
    if mlp is None and down is None:  # no MLP module: the down projection sits in the block (OPT's fc2)
        down = detect.find_proj(block, "", d_model, detect.DOWN_NAMES, path, order, down=True, skip=attn)
        mlp = down
    return BlockPaths(path, full(attn), full(mlp), full(out_proj), full(down))


def _embed_writes(model: nn.Module, trace: Trace, block_paths: list[str], d_model: int | None,
                  embed: str | None) -> tuple[str, ...] | None:
    """Token and position embeddings of width d_model outside the blocks, if they make the stream."""
    if not block_paths or not d_model:
        return None
    found = [p for p, m in model.named_modules()
             if isinstance(m, nn.Embedding) and m.embedding_dim == d_model and detect.outside(p, block_paths)]
    if embed and embed not in found:
        found.insert(0, embed)
    return embedding_writes(trace, found, block_paths[0])


def _checked(b: BlockPaths, trace: Trace, over: dict[str, Any]) -> BlockPaths:
    """``b`` with its residual writes (established and checked) and its attention pattern."""
    given = {k: f"{b.path}.{over[f'{k}_write']}" for k in ("attn", "mlp") if f"{k}_write" in over}
    for key, path in given.items():
        _ran(trace, path, f"{key}_write= (relative to block {b.path!r}) ")
    attn_w, mlp_w, error = establish(trace, b.path, b.attn, b.mlp, {"attn": b.attn_out_proj, "mlp": b.mlp_down_proj}, given)
    if error is not None and given:
        raise StructureError(f"the writes given for block {b.path!r} do not add up: {error}")
    pattern, element = _find_pattern(b, trace)
    return dataclasses.replace(b, attn_write=attn_w, mlp_write=mlp_w, writes_error=error, pattern=pattern,
                               pattern_element=element)


def _find_pattern(b: BlockPaths, trace: Trace) -> tuple[str | None, int | None]:
    """Where the attention pattern can be read: a module inside the attention that returns
    a ``[batch, heads, q, k]`` softmax (the zoo's ``attn.pattern``), else element 1 of an
    attention module that returns a tuple (Hugging Face attention: ``(output, weights)``,
    the weights present under eager attention only)."""
    if b.attn is None:
        return None, None
    for path, value in trace.values.items():
        if path.startswith(b.attn + ".") and value.dim() == 4 and value.shape[-1] == value.shape[-2] \
                and value.is_floating_point() and torch.allclose(value.double().sum(-1), torch.ones((), dtype=torch.float64)):
            return path, None
    out = trace.outputs.get(b.attn)
    if out is not None and out.kind == "tuple" and out.text.count(",") >= 1:
        return b.attn, 1
    return None, None


__all__ = ["BlockPaths", "ModelStructure", "StructureError", "structure"]
