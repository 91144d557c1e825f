"""Named sites of a transformer: ``resid_post.3``, ``head_out.2.5``, ``embed``, ...

An alias is a :class:`~mechscope.core.site.Site` built from the model's
:func:`~mechscope.core.structure.structure`, so the same name means the same place in any
family (GPT-2's ``transformer.h.3``, Llama's ``model.layers.3``) and the site knows
whether its module returns a tensor or a tuple (``element``). Every function takes the
model (or an already built ``ModelStructure``) first; layers may be negative.

=============  ==============================================================
``embed``      output of the token embedding
``resid_pre``  input of block l (its ``hidden_states`` argument)
``attn_out``   output of block l's attention module (the attention output)
``head_out``   one head's output before the output projection (its input, split by head)
``mlp_hidden`` input of block l's MLP down projection (post-nonlinearity, width d_mlp)
``mlp_out``    output of block l's MLP
``resid_post`` output of block l
``unembed``    output of the unembedding (the logits)
=============  ==============================================================
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from mechscope.core.run import find_module
from mechscope.core.site import Site
from mechscope.core.structure import ModelStructure, StructureError, structure

LAYER_ALIASES = ("resid_pre", "attn_out", "head_out", "mlp_hidden", "mlp_out", "resid_post")
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


def attn_out(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Output of block ``layer``'s attention module (element 0 when it returns a tuple)."""
    s = _s(model)
    b = s.block(layer)
    path = _need(b.attn, "attention module (a submodule with q/k/v or fused qkv projections)", "attn", f" in block {b.path!r}")
    return Site(path, element=s.element(path), name=f"attn_out.{layer % s.n_layers}")


def mlp_out(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Output of block ``layer``'s MLP."""
    s = _s(model)
    b = s.block(layer)
    path = _need(b.mlp, "MLP (a submodule with a d_mlp -> d_model projection)", "mlp", f" in block {b.path!r}")
    return Site(path, element=s.element(path), name=f"mlp_out.{layer % s.n_layers}")


def mlp_hidden(model: nn.Module | ModelStructure, layer: int) -> Site:
    """Input of block ``layer``'s MLP down projection: the hidden activation, width d_mlp."""
    s = _s(model)
    b = s.block(layer)
    path = _need(b.mlp_down_proj, "MLP down projection (a linear d_mlp -> d_model)", "mlp_down_proj", f" in block {b.path!r}")
    name = f"mlp_hidden.{layer % s.n_layers}"
    _called(s, path, name)
    return Site(path, io="input", name=name)


def head_out(model: nn.Module | ModelStructure, layer: int, head: int) -> Site:
    """Head ``head``'s output in block ``layer``: its slice of the attention output projection's input."""
    s = _s(model)
    b = s.block(layer)
    path = _need(b.attn_out_proj, "attention output projection (a linear n_heads*head_dim -> d_model)", "attn_out_proj", f" in block {b.path!r}")
    if not s.n_heads or not s.head_dim:
        raise StructureError(f"the number of heads / head width of {s.model_class} is unknown; pass structure(model, n_heads=..., head_dim=...)")
    if isinstance(head, bool) or not isinstance(head, int) or not -s.n_heads <= head < s.n_heads:
        raise StructureError(f"head {head!r} is out of range: the model has {s.n_heads} heads; valid: 0..{s.n_heads - 1} (or -{s.n_heads}..-1)")
    name = f"head_out.{layer % s.n_layers}.{head % s.n_heads}"
    _called(s, path, name)
    return Site(path, io="input", heads=(head % s.n_heads,), head_dim=s.head_dim, name=name)


_LAYER_FNS = {"resid_pre": resid_pre, "attn_out": attn_out, "mlp_hidden": mlp_hidden, "mlp_out": mlp_out, "resid_post": resid_post}
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
                add(lambda: _LAYER_FNS[alias](s, layer), f"{alias}.{layer}", s.d_mlp if alias == "mlp_hidden" else s.d_model)
    add(lambda: unembed(s), "unembed", vocab)
    for path, cls in classes.items():
        rows.append(dict(name=path, kind="module", path=path, io="output", element=None, **{"class": cls},
                         returns=_returns(s, path), width=None, heads=None, head_dim=None))
    return rows


def _returns(s: ModelStructure, path: str) -> str | None:
    out = s.outputs.get(path)
    return out.text if out is not None else None


__all__ = ["ALIASES", "LAYER_ALIASES", "embed", "unembed", "resid_pre", "resid_post", "attn_out", "mlp_out",
           "mlp_hidden", "head_out", "resolve", "list_sites"]
