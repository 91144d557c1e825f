"""The permanent form of directional ablation: orthogonalise the weights that write to the
residual stream (Arditi et al. 2024, arXiv 2406.11717).

For a unit direction r, every matrix that writes to the residual stream is replaced by
``(I - r r^T) W`` (and its bias by ``(I - r r^T) b``): token and position embeddings
(their rows), attention output projections and MLP down projections. The edited model
then computes what the hook form (:func:`mechscope.steer.apply.ablate`) computes, with no
hooks, *where the algebra allows it*: the stream before block 0 must be the embeddings'
sum and every block write must be its projection's own output (both checked on the
structure probe, :mod:`mechscope.core.writes`). Where a norm sits between a projection and
the stream (Gemma 2/3 and OLMo 2 normalise each sublayer's output before adding it), no
edit of the projection commutes with the norm's RMS and per-channel scale, and this
refuses instead of approximating; the hooked ablation projects at the write itself.

Tied weights: when the token embedding shares its matrix with the unembedding (GPT-2),
the edited embedding gets its own copy, so the unembedding is left as it was (the hook
form does not touch the unembedding either). Hugging Face's ``tie_weights()`` would tie
them again, so save the edited model with ``tie_word_embeddings=False``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.core.detect import is_conv1d
from mechscope.core.run import find_module
from mechscope.core.structure import StructureError, structure
from mechscope.steer.apply import SteeringError, as_direction


def _shared(model: nn.Module, weight: Tensor, owner: nn.Module) -> bool:
    return any(p is weight for name, m in model.named_modules() if m is not owner
               for p in m.parameters(recurse=False))


@torch.no_grad()
def _project_rows(w: Tensor, r: Tensor) -> None:  # w [rows, d] <- w - (w r) r^T
    w -= (w @ r)[:, None] * r[None, :]


@torch.no_grad()
def _project_cols(w: Tensor, r: Tensor) -> None:  # w [d, cols] <- w - r (r^T w)
    w -= r[:, None] * (r @ w)[None, :]


def orthogonalize_weights(model: nn.Module, direction: Any, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with ``direction`` removed from every residual write."""
    v = as_direction(direction, "ablation direction")
    d_model = structure(model).d_model
    if d_model and v.shape[0] != d_model:
        raise SteeringError(f"the direction has dimension {v.shape[0]} but the residual stream has width {d_model}")
    paths = weight_writers(model)  # on the original, so structure detection is not redone on the copy
    target = model if inplace else copy.deepcopy(model)
    for path in paths:
        m = find_module(target, path)
        r = (v / v.norm()).to(m.weight.device, torch.float64)
        if isinstance(m, nn.Embedding):
            if _shared(target, m.weight, m):
                m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            _edit(m.weight, r, rows=True)
        elif isinstance(m, nn.Linear):
            _edit(m.weight, r, rows=False)
            if m.bias is not None:
                _edit_bias(m.bias, r)
        elif is_conv1d(m):
            _edit(m.weight, r, rows=True)
            if getattr(m, "bias", None) is not None:
                _edit_bias(m.bias, r)
        else:
            raise SteeringError(f"cannot orthogonalise {path!r} ({type(m).__name__}): only nn.Embedding, nn.Linear "
                                "and Conv1D writers are supported; use the hook form steer.apply.ablate instead")
    return target


def weight_writers(model: nn.Module) -> list[str]:
    """Paths of the modules whose weights write to the stream: the embeddings, then each
    block's output and down projections; a StructureError where an edit of them is not
    an edit of what the block adds."""
    s = structure(model)
    if s.n_layers == 0 or not s.d_model:
        raise StructureError(f"{s.model_class}: no block list / d_model was found, so the residual stream's writers "
                             "are unknown; pass them with structure(model, blocks=..., ...)")
    if not s.embed_writes:
        raise StructureError(f"{s.model_class}: the stream before block 0 is not a sum of the embeddings (something "
                             "sits in between), so an edit of the embedding weights would not remove the direction; "
                             "use the hooked ablation mechscope.steer.apply.ablate, which projects at block 0's input")
    paths = list(s.embed_writes)
    for b in s.blocks:
        for write, proj in ((b.attn_write, b.attn_out_proj), (b.mlp_write, b.mlp_down_proj)):
            if write is None:
                continue
            if not write.is_proj or proj is None:
                raise StructureError(
                    f"block {b.path!r} adds the output of {write.path!r} to the residual stream, not the output of its "
                    f"projection {proj!r}: a norm (or another map) sits in between, and no edit of the projection's "
                    "weights commutes with a norm's RMS and per-channel scale; use the hooked ablation "
                    "mechscope.steer.apply.ablate (`mechscope steer --action ablate`), which projects at the write itself")
            paths.append(proj)
        b.writes()  # the reason, when they are unknown
    return paths


@torch.no_grad()
def _edit(weight: Tensor, r: Tensor, rows: bool) -> None:
    """In float64, then cast back: one rounding instead of one per product."""
    w = weight.detach().double()
    _project_rows(w, r) if rows else _project_cols(w, r)
    weight.copy_(w.to(weight.dtype))


@torch.no_grad()
def _edit_bias(bias: Tensor, r: Tensor) -> None:
    b = bias.detach().double()
    bias.copy_((b - (b @ r) * r).to(bias.dtype))
