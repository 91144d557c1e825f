"""A decomposition of a model's layers: subcomponents and importance functions per site.

:class:`Decomposition` is the trainable state of SPD: for every decomposed module path,
its :mod:`components <mechscope.spd.components>` and its causal-importance function. The
target model is *not* a submodule (it stays frozen and is never saved with the
decomposition); the decomposition reads its weights live and records a fingerprint of
them, so that a checkpoint is never applied to another target.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.core.run import cache as cache_sites
from mechscope.core.run import find_module
from mechscope.core.site import Site
from mechscope.spd.components import (
    Components,
    EmbeddingComponents,
    LayerKind,
    LinearComponents,
    SPDError,
    TiedComponents,
    decomposable_paths,
    layer_kind,
    target_bias,
    target_weight,
)
from mechscope.spd.config import SPDConfig
from mechscope.spd.importance import make_importance
from mechscope.spd.masks import hard_sigmoid, lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid


@dataclass(frozen=True)
class LayerInfo:
    """What a decomposed site is: its path, kind, shape and (for tied layers) source."""

    path: str
    kind: LayerKind
    d_in: int
    d_out: int
    C: int
    tied_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(path=self.path, kind=self.kind, d_in=self.d_in, d_out=self.d_out, C=self.C, tied_to=self.tied_to)


def module_key(path: str) -> str:
    """A ModuleDict key for a module path (dots are not allowed in keys)."""
    return path.replace(".", "__") or "__root__"


def target_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of the target (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.state_dict().items())):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _identity_width(model: nn.Module, path: str, example_inputs: Any) -> int:
    if example_inputs is None:
        raise SPDError(f"site {path!r} is an nn.Identity, whose width is only known from an activation; "
                       "pass example_inputs (one batch of the model's inputs) to build the decomposition")
    site = Site(path, io="input")
    with torch.no_grad():
        return int(cache_sites(model, example_inputs, [site])[site].shape[-1])


def describe_layers(model: nn.Module, cfg: SPDConfig, example_inputs: Any = None) -> list[LayerInfo]:
    """Check every site of ``cfg`` against ``model`` and say what each one is."""
    if not cfg.sites:
        raise SPDError("no sites to decompose: give the module paths of linear or embedding layers, e.g. "
                       f"sites=({', '.join(repr(p) for p in decomposable_paths(model)[:3])})")
    if len(set(cfg.sites)) != len(cfg.sites):
        raise SPDError(f"sites are listed more than once: {list(cfg.sites)}")
    tied = cfg.tied_pairs()
    for dst, src in tied.items():
        if dst not in cfg.sites or src not in cfg.sites:
            raise SPDError(f"tied pair {dst}={src}: both must be decomposed sites; sites are {list(cfg.sites)}")
        if src in tied:
            raise SPDError(f"tied pair {dst}={src}: the source {src!r} is itself tied; tie to an untied layer")
    infos = []
    for path in cfg.sites:
        module = find_module(model, path)
        kind = layer_kind(module)
        if kind is None:
            raise SPDError(
                f"site {path!r} is a {type(module).__name__}, not a linear or embedding layer; SPD decomposes "
                "the weights of nn.Linear, nn.Embedding, transformers Conv1D or an inserted nn.Identity. "
                f"Decomposable paths of this model: {decomposable_paths(model)[:12]}")
        if kind == "identity":
            d_in = d_out = _identity_width(model, path, example_inputs)
        else:
            d_out, d_in = target_weight(module, kind).shape
        infos.append(LayerInfo(path, kind, int(d_in), int(d_out), cfg.C_of(path), tied.get(path)))
    by_path = {i.path: i for i in infos}
    for info in infos:
        if info.tied_to is not None:
            src = by_path[info.tied_to]
            if (src.d_in, src.d_out) != (info.d_out, info.d_in) or src.C != info.C:
                raise SPDError(f"cannot tie {info.path} ({info.d_out}x{info.d_in}, C={info.C}) to the transpose of "
                               f"{src.path} ({src.d_out}x{src.d_in}, C={src.C}): shapes or C differ")
    return infos


class Decomposition(nn.Module):
    """Subcomponents and causal-importance functions for each decomposed site of ``model``."""

    def __init__(self, model: nn.Module, cfg: SPDConfig, example_inputs: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = describe_layers(model, cfg, example_inputs)
        self.paths = [info.path for info in self.layers]
        self.info = {info.path: info for info in self.layers}
        self._model = (model,)  # not a submodule: the target is frozen and never saved here
        self.fingerprint = target_fingerprint(model)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.components = nn.ModuleDict()
        self.importance = nn.ModuleDict()
        for info in self.layers:  # untied first, so that tied ones find their source
            if info.tied_to is None:
                cls = EmbeddingComponents if info.kind == "embedding" else LinearComponents
                self.components[module_key(info.path)] = cls(info.C, info.d_in, info.d_out, gen)
        for info in self.layers:
            if info.tied_to is not None:
                self.components[module_key(info.path)] = TiedComponents(self.components[module_key(info.tied_to)])
            self.importance[module_key(info.path)] = make_importance(cfg.ci_fn, info.C, info.d_in, cfg.ci_hidden, gen)
        for info in self.layers:
            if info.kind == "identity":
                self.register_buffer(f"eye_{module_key(info.path)}", torch.eye(info.d_in), persistent=False)

    # -- the target ----------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def target_weight(self, path: str) -> Tensor:  # [d_out, d_in]
        info = self.info[path]
        if info.kind == "identity":
            return getattr(self, f"eye_{module_key(path)}")
        return target_weight(find_module(self.model, path), info.kind)

    def target_bias(self, path: str) -> Tensor | None:  # [d_out]
        return target_bias(find_module(self.model, path), self.info[path].kind)

    # -- subcomponents -------------------------------------------------------------------
    def comps(self, path: str) -> Components:
        return self.components[module_key(path)]

    def component_parameters(self) -> list[nn.Parameter]:
        return list(self.components.parameters())

    def importance_parameters(self) -> list[nn.Parameter]:
        return list(self.importance.parameters())

    def layer_output(self, path: str, a: Tensor, mask: Tensor | None, delta: Tensor | None = None,
                     inner: Tensor | None = None) -> Tensor:
        """The decomposed layer's output on input ``a``: ``U (m ⊙ V a) + bias [+ δ (W - UV) a]``.

        ``inner`` (``V a``) may be given when already computed; ``delta`` is the delta
        component's random scale per example (and position), or None for no delta.
        """
        comps = self.comps(path)
        h = comps.inner(a) if inner is None else inner  # [..., C]
        out = comps.expand(h if mask is None else h * mask)  # [..., d_out]
        bias = self.target_bias(path)
        if bias is not None:
            out = out + bias
        if delta is not None:
            out = out + delta.unsqueeze(-1) * comps.delta_out(a, self.target_weight(path))
        return out

    def layer_output_from_target(self, path: str, inner: Tensor, mask: Tensor | None, delta: Tensor | None,
                                 target_out: Tensor) -> Tensor:
        """:meth:`layer_output` given the target layer's own output ``W a + bias`` on the same input.

        ``U (m ⊙ h) + b + δ (W a − U h) = U ((m − δ) ⊙ h) + (1 − δ) b + δ (W a + b)``: the delta
        component costs no matmul, because the hooked module has already computed ``W a + b``.
        """
        comps = self.comps(path)
        if delta is None:
            return self.layer_output(path, inner, mask, None, inner=inner)
        d = delta.unsqueeze(-1)  # [..., 1]
        m = d.new_ones(()) if mask is None else mask
        # under bf16 autocast the module's output is bf16: scale it in bf16 (the random scale has
        # no gradient), not through a float32 copy of the layer's output and its cast back
        dt = d.to(target_out.dtype) if target_out.is_floating_point() and not d.requires_grad else d
        out = comps.expand(inner * (m - d)) + dt * target_out
        bias = self.target_bias(path)
        return out if bias is None else out + (1.0 - d) * bias

    def faithfulness(self) -> Tensor:
        """``Σ_l ‖W_l − U_l V_l‖²_F / (number of decomposed parameters)``."""
        total, count = 0.0, 0
        for path in self.paths:
            diff = self.target_weight(path) - self.comps(path).weight()
            total = total + diff.pow(2).sum()
            count += diff.numel()
        return total / count

    # -- causal importance ---------------------------------------------------------------
    def importance_logits(self, path: str, a: Tensor, inner: Tensor) -> Tensor:  # [..., C]
        """Pre-activations ``z`` of the importance function on input ``a`` (inner acts ``V a``)."""
        return self.importance[module_key(path)](inner, a)

    def causal_importance(self, acts: dict[str, Tensor], kind: str = "hard") -> dict[str, Tensor]:
        """Importances ``g`` per site from the target's layer inputs (``hard``, ``lower`` or ``upper``)."""
        squash = {"hard": hard_sigmoid,
                  "lower": lambda z: lower_leaky_hard_sigmoid(z, self.cfg.leak),
                  "upper": lambda z: upper_leaky_hard_sigmoid(z, self.cfg.leak)}[kind]
        out = {}
        for path in self.paths:
            a = acts[path]
            out[path] = squash(self.importance_logits(path, a, self.comps(path).inner(a)))
        return out

    def subcomponent_norms(self) -> dict[str, Tensor]:  # {path: [C]}
        with torch.no_grad():
            return {p: self.comps(p).subcomponent_norms() for p in self.paths}

    def describe(self) -> dict[str, Any]:
        return {"layers": [i.to_dict() for i in self.layers], "target_fingerprint": self.fingerprint,
                "config": self.cfg.to_dict()}
