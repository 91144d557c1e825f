"""Named sites of a transformer: ``resid_post.3``, ``head_out.2.5``, ``embed``, ...

An alias is a :class:`~mechscope.core.site.Site` built from the model's
:func:`~mechscope.core.structure.structure`, so the same name means the same place in any
family (GPT-2's ``transformer.h.3``, Llama's ``model.layers.3``) and the site knows
whether its module returns a tensor or a tuple (``element``). Every function takes the
model (or an already built ``ModelStructure``) first; layers may be negative.

=============  ==============================================================
``embed``      output of the token embedding
``resid_pre``  input of block l (its ``hidden_states`` argument)
``attn_out``   what block l adds to the stream for its attention (after any post-norm)
``head_out``   one head's output before the output projection (its input, split by head)
``head_in``    one head's query, key or value (its slice of the q/k/v projection's output)
``attn_pattern`` block l's attention pattern ``[batch, heads, query, key]``
``mlp_hidden`` input of block l's MLP down projection (post-nonlinearity, width d_mlp)
``mlp_out``    what block l adds to the stream for its MLP (after any post-norm)
``resid_post`` output of block l
``unembed``    output of the unembedding (the logits, before any final softcap Gemma 2 applies)
=============  ==============================================================

``attn_out`` and ``mlp_out`` are the block's *writes* (:mod:`mechscope.core.writes`):
``resid_post(l) - resid_pre(l) == attn_out(l) + mlp_out(l)`` was checked on the probe
forward, and where it could not be, these aliases raise :class:`StructureError`. Every
view is ``[batch, pos, ...]``, also where a module runs on flattened rows (OPT's MLP).
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Any

from torch import nn

from mechscope.core.run import find_module
from mechscope.core.site import Site
from mechscope.core.structure import ModelStructure, StructureError, structure

LAYER_ALIASES = ("resid_pre", "attn_out", "head_out", "attn_pattern", "mlp_hidden", "mlp_out", "resid_post")
ALIASES = ("embed", *LAYER_ALIASES, "unembed")

_HOW = "pass it with structure(model, {key}=...)"


def _s(model: nn.Module | ModelStructure) -> ModelStructure:
    return model if isinstance(model, ModelStructure) else structure(model)


def _need(value: str | None, what: str, key: str, where: str = "") -> str:
    if value is None:
        raise StructureError(f"no {what} was found{where}; {_HOW.format(key=key)}")
    return value


def _called(s: ModelStructure, path: str, alias: str) -> None:
    """An input site only fires if the module is *called*; the probe knows whether it is."""
    if s.outputs and path not in s.outputs:
        raise StructureError(
            f"{alias}: module {path!r} exists but is never called in the forward (its weight is used "
            "directly, e.g. inside nn.MultiheadAttention), so a hook on it would never fire; use a site "
            "on a module that runs, or restructure the model to call it"
        )


def embed(model: nn.Module | ModelStructure) -> Site:
    """Output of the token embedding."""
    s = _s(model)
    path = _need(s.embed, "token embedding (get_input_embeddings() or an nn.Embedding outside the blocks)", "embed")
    return Site(path, element=s.element(path), name="embed")


def unembed(model: nn.Module | ModelStructure) -> Site:
    """Output of the unembedding: the logits."""
    s = _s(model)
    path = _need(s.unembed, "unembedding (get_output_embeddings() or a linear from d_model after the blocks)", "unembed")
    return Site(path, element=s.element(path), name="unembed")


def resid_pre(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Input of block ``layer``: the residual stream before it."""
    s = _s(model)
    b = s.block(layer)
    return Site(b.path, io="input", name=f"resid_pre.{layer % s.n_layers}")


def resid_post(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Output of block ``layer``: the residual stream after it."""
    s = _s(model)
    b = s.block(layer)
    return Site(b.path, element=s.element(b.path), name=f"resid_post.{layer % s.n_layers}")


def _write_site(s: ModelStructure, layer: int, key: str) -> Site:
    b = s.block(layer)
    name = f"{key}_out.{layer % s.n_layers}"
    b.writes()  # raises with the reason when the writes are unknown
    write = b.attn_write if key == "attn" else b.mlp_write
    if write is None:
        what = "attention" if key == "attn" else "MLP"
        raise StructureError(f"{name}: block {b.path!r} adds no {what} output to the residual stream (none was found); "
                             f"pass it with structure(model, {key}_write='...') (path relative to the block)")
    return Site(write.path, element=s.element(write.path), rows_of=b.path if write.flat else None, name=name)


def attn_out(model: nn.Module | ModelStructure, layer: int) -> Site:
    """What block ``layer`` adds to the residual stream for its attention (checked)."""
    return _write_site(_s(model), layer, "attn")


def mlp_out(model: nn.Module | ModelStructure, layer: int) -> Site:
    """What block ``layer`` adds to the residual stream for its MLP (checked)."""
    return _write_site(_s(model), layer, "mlp")


def mlp_hidden(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Input of block ``layer``'s MLP down projection: the hidden activation, width d_mlp."""
    s = _s(model)
    b = s.block(layer)
    path = _need(b.mlp_down_proj, "MLP down projection (a linear d_mlp -> d_model)", "mlp_down_proj", f" in block {b.path!r}")
    name = f"mlp_hidden.{layer % s.n_layers}"
    _called(s, path, name)
    flat = b.mlp_write is not None and b.mlp_write.flat
    return Site(path, io="input", rows_of=b.path if flat else None, name=name)


_SWITCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def attn_pattern(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Block ``layer``'s attention pattern, ``[batch, heads, query, key]``.

    Hugging Face attention returns its weights only under eager attention: given the
    model, a model running another implementation (SDPA, flash) is switched to eager with
    a warning (once per model); given only its structure, the run fails with an error
    naming the option if the weights are missing. Eager and SDPA agree to float rounding,
    not bit for bit.
    """
    s = _s(model)
    b = s.block(layer)
    name = f"attn_pattern.{layer % s.n_layers}"
    path = _need(b.pattern, "attention pattern (a [batch, heads, q, k] softmax inside the attention, or "
                 "attention weights returned as element 1)", "attn", f" in block {b.path!r}")
    if b.pattern_element is not None and isinstance(model, nn.Module):
        ensure_eager(model)
    return Site(path, element=b.pattern_element, name=name)


def ensure_eager(model: nn.Module) -> None:
    """Switch a Hugging Face model to eager attention (which returns its weights), saying so once."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        return
    setter = getattr(model, "set_attn_implementation", None)
    if not callable(setter):
        raise StructureError(f"{type(model).__name__} runs {current!r} attention, which returns no attention weights, "
                             "and cannot be switched; load it with attn_implementation='eager'")
    setter("eager")
    if getattr(config, "_attn_implementation", None) != "eager":
        raise StructureError(f"{type(model).__name__} did not switch from {current!r} to eager attention; load it "
                             "with attn_implementation='eager' to read attention patterns")
    if model not in _SWITCHED:
        _SWITCHED.add(model)
        warnings.warn(f"mechscope switched {type(model).__name__} from {current!r} to eager attention to read its "
                      "attention patterns (outputs agree to float rounding, not bit for bit); "
                      f"model.set_attn_implementation({current!r}) switches it back", stacklevel=3)


def head_out(model: nn.Module | ModelStructure, layer: int, head: int) -> Site:
    """Head ``head``'s output in block ``layer``: its slice of the attention output projection's input."""
    s = _s(model)
    b = s.block(layer)
    path = _need(b.attn_out_proj, "attention output projection (a linear n_heads*head_dim -> d_model)", "attn_out_proj", f" in block {b.path!r}")
    _check_head(s, head)
    name = f"head_out.{layer % s.n_layers}.{head % s.n_heads}"
    _called(s, path, name)
    return Site(path, io="input", heads=(head % s.n_heads,), head_dim=s.head_dim, name=name)


def head_in(model: nn.Module | ModelStructure, layer: int, head: int, part: str) -> Site:
    """Head ``head``'s query, key or value (``part`` "q", "k", "v") in block ``layer``: its
    slice of that projection's output, where path patching lands a path into the head.
    With grouped-query attention a key/value head serves several query heads; the site is
    the key/value head that query head ``head`` reads."""
    s = _s(model)
    b = s.block(layer)
    if part not in ("q", "k", "v"):
        raise StructureError(f"head_in: part must be 'q', 'k' or 'v', got {part!r}")
    _check_head(s, head)
    if b.qkv is None:
        raise StructureError(f"block {b.path!r} has no separate query/key/value projections that were found (a fused "
                             "qkv layout, or unknown); give the receiver as a Site on the projection yourself, e.g. "
                             "Site(path, features=...) for a head's columns of a fused projection")
    index = "qkv".index(part)
    h = head % s.n_heads
    if part != "q":
        h //= s.n_heads // (s.n_kv_heads or s.n_heads)
    name = f"head_in.{layer % s.n_layers}.{head % s.n_heads}.{part}"
    return Site(b.qkv[index], heads=(h,), head_dim=s.head_dim, name=name)


def _check_head(s: ModelStructure, head: int) -> None:
    if not s.n_heads or not s.head_dim:
        raise StructureError(f"the number of heads / head width of {s.model_class} is unknown; pass structure(model, n_heads=..., head_dim=...)")
    if isinstance(head, bool) or not isinstance(head, int) or not -s.n_heads <= head < s.n_heads:
        raise StructureError(f"head {head!r} is out of range: the model has {s.n_heads} heads; valid: 0..{s.n_heads - 1} (or -{s.n_heads}..-1)")


_LAYER_FNS = {"resid_pre": resid_pre, "attn_out": attn_out, "attn_pattern": attn_pattern, "mlp_hidden": mlp_hidden,
              "mlp_out": mlp_out, "resid_post": resid_post}
_PATH = re.compile(r"^(?P<path>[^:\[\]]*)(?::(?P<io>input|output))?(?:\[(?P<el>[^\]]+)\])?$")


def resolve(model: nn.Module | ModelStructure, spec: str, **fields: Any) -> Site:
    """The site named by ``spec``: an alias (``"resid_post.3"``, ``"head_out.1.0"``, ``"embed"``)
    or a module path, optionally with io and element as :meth:`Site.describe` prints them
    (``"transformer.h.0.attn"``, ``"transformer.h.0.mlp:input"``, ``"transformer.h.0.attn[0]"``).

    An alias wins over a module path of the same name unless the alias is malformed or
    out of range and the module exists. ``fields`` (positions=, features=, ...) are set
    on the returned site. Module paths are checked against the model (not when ``model``
    is a ModelStructure, which holds no modules).
    """
    if not isinstance(spec, str):
        raise TypeError(f"a site spec must be a string, got {type(spec).__name__}")
    module = model if isinstance(model, nn.Module) else None
    try:
        site = _alias(model, spec)
    except StructureError:
        if module is None or spec not in dict(module.named_modules()):
            raise
        site = None
    if site is None:
        site = _module_site(module, spec)
    return site.replace(**fields) if fields else site


def _alias(model: nn.Module | ModelStructure, spec: str) -> Site | None:
    name, *rest = spec.split(".")
    if name not in ALIASES:
        return None
    if name in ("embed", "unembed"):
        if rest:
            raise StructureError(f"alias {name!r} takes no layer, got {spec!r}")
        return embed(model) if name == "embed" else unembed(model)
    want = 2 if name == "head_out" else 1
    example = f"{name}.3" + (".0" if name == "head_out" else "")
    if len(rest) != want or not all(re.fullmatch(r"-?\d+", r) for r in rest):
        raise StructureError(f"alias {name!r} needs {'a layer and a head' if want == 2 else 'a layer'}, e.g. {example!r}; got {spec!r}")
    nums = [int(r) for r in rest]
    if name == "head_out":
        return head_out(model, nums[0], nums[1])
    return _LAYER_FNS[name](model, nums[0])


def _module_site(model: nn.Module | None, spec: str) -> Site:
    match = _PATH.match(spec)
    if match is None:
        raise StructureError(f"cannot read site spec {spec!r}: expected an alias ({', '.join(ALIASES)}) or 'module.path[:input|:output][[element]]'")
    path, io, el = match.group("path"), match.group("io") or "output", match.group("el")
    if model is not None:
        find_module(model, path)
    element: int | str | None = int(el) if el is not None and re.fullmatch(r"-?\d+", el) else el
    return Site(path, io=io, element=element)


def list_sites(model: nn.Module) -> list[dict[str, Any]]:
    """Every alias that applies to ``model`` (with its path, io, element), then every module.

    Each entry has the keys name, kind ("alias" or "module"), path, io, element, class,
    returns (what the module returned in the probe forward, or None if it never ran),
    width (the last dimension of an alias's view), heads and head_dim (for ``head_out``:
    the number of heads its ``<h>`` ranges over, and their width).
    """
    s = structure(model)
    classes = {p: type(m).__name__ for p, m in model.named_modules()}
    rows: list[dict[str, Any]] = []

    def add(build: Any, name: str, width: int | None, heads: int | None = None) -> None:
        try:
            site = build()
        except StructureError:  # the alias does not apply to this model
            return
        rows.append(dict(name=name, kind="alias", path=site.path, io=site.io, element=site.element,
                         **{"class": classes.get(site.path)}, returns=_returns(s, site.path),
                         width=width, heads=heads, head_dim=site.head_dim))

    vocab = s.outputs[s.unembed].width if s.unembed in s.outputs else None
    add(lambda: embed(s), "embed", s.d_model)
    for layer in range(s.n_layers):
        for alias in LAYER_ALIASES:
            if alias == "head_out":
                add(lambda: head_out(s, layer, 0), f"head_out.{layer}.<h>", s.head_dim, s.n_heads)
            else:
                width = {"mlp_hidden": s.d_mlp, "attn_pattern": None}.get(alias, s.d_model)
                add(lambda: _LAYER_FNS[alias](s, layer), f"{alias}.{layer}", width)
    add(lambda: unembed(s), "unembed", vocab)
    for path, cls in classes.items():
        rows.append(dict(name=path, kind="module", path=path, io="output", element=None, **{"class": cls},
                         returns=_returns(s, path), width=None, heads=None, head_dim=None))
    return rows


def _returns(s: ModelStructure, path: str) -> str | None:
    out = s.outputs.get(path)
    return out.text if out is not None else None


__all__ = ["ALIASES", "LAYER_ALIASES", "embed", "unembed", "resid_pre", "resid_post", "attn_out", "mlp_out",
           "mlp_hidden", "head_out", "head_in", "attn_pattern", "ensure_eager", "resolve", "list_sites"]
