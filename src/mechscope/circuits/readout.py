"""Logits at the positions a metric reads, and only there.

A metric that reads the logits at a few positions (``readout``, e.g. the last) needs the
final norm and the unembedding at those positions only: at a vocabulary of thousands the
unembedding of every position is a large share of a small model's forward, and of its
backward. :func:`find_head` finds the modules after the last block
(:func:`mechscope.core.structure.structure`); :meth:`Head.reproduces` checks them against
the model's own logits on a run that computed them anyway, so that a model whose forward
does more after its blocks (soft-capping, scaling) is never read this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mechscope.core import aliases
from mechscope.core.replay import chain, error_scale
from mechscope.core.site import Site
from mechscope.core.structure import structure
from mechscope.core.suffix import has_forward_from


@dataclass(frozen=True)
class Head:
    """How to get the logits at the readout positions from the stream at ``anchor``.

    ``last_block``: the anchor is the last block's *input* and that block runs at the
    readout positions only (its keys and values at every position) before the final norm
    and unembedding (the zoo transformer); otherwise the anchor is the last block's output.
    """

    anchor: Site  # [batch, pos, d_model]
    modules: tuple[nn.Module, ...]  # the final norm (if any), then the unembedding
    last_block: nn.Module | None = None

    def __call__(self, stream: Tensor, readout: Sequence[int], inputs: Any = None) -> Tensor:
        """Logits [batch, len(readout), vocab] from the anchor's activation [batch, pos, d_model]."""
        t = stream.shape[1]
        if self.last_block is None:
            x = stream[:, list(readout)]
        else:  # positions are the queries; every position gives keys and values
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            empty = stream.new_empty(stream.shape[0], 0, self.last_block.attn.k.out_features)
            x = self.last_block.forward_from(stream, (empty, empty), mask, torch.tensor([r % t for r in readout]))
        return chain(self.modules, x)

    def reproduces(self, stream: Tensor, readout: Sequence[int], inputs: Any, logits: Tensor) -> bool:
        """Whether the head on ``stream`` gives ``logits`` (the model's own, at the readout),
        checked on the first example (what the model does after its blocks is the same code
        for every example)."""
        if isinstance(inputs, dict) and isinstance(inputs.get("attention_mask"), Tensor):
            inputs = {"attention_mask": inputs["attention_mask"][:1]}
        stream, logits = stream[:1], logits[:1]
        try:
            with torch.no_grad():
                got = self(stream, readout, inputs)
        except Exception:  # noqa: BLE001 - a head that cannot run is not this model's
            return False
        if not isinstance(got, Tensor) or got.shape != logits.shape:
            return False
        err, scale = error_scale(got, logits)
        return err <= 1e-4 * scale


def find_head(model: nn.Module, sites: Sequence[Site] = ()) -> Head | None:
    """The modules after the stream, for a run that must still reach every one of ``sites``;
    None where none is found (the caller then computes every position)."""
    try:
        s = structure(model)
        if not s.n_layers or s.unembed is None:
            return None
        modules = tuple(model.get_submodule(p) for p in (s.final_norm, s.unembed) if p)
        last = s.blocks[-1].path
    except Exception:  # noqa: BLE001 - no structure: the caller computes every position
        return None
    after = [p for p in (s.final_norm, s.unembed) if p]
    if any(not site.path or any(site.path == p or site.path.startswith(p + ".") for p in after) for site in sites):
        return None
    inside = any(site.path.startswith(last + ".") or (site.path == last and site.io == "output") for site in sites)
    if has_forward_from(model, s) and not inside:
        return Head(Site(last, io="input"), modules, model.get_submodule(last))
    return Head(aliases.resid_post(s, -1).replace(name=None), modules)


def read_positions(logits: Any, readout: Sequence[int] | None) -> Any:
    """``logits`` [batch, pos, vocab] at the readout positions (all when None)."""
    return logits if readout is None else logits[:, list(readout)]
