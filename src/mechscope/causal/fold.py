"""DAS's interchange folded into the layer after the site: the tail engine's path for a
hard subspace interchange on a ``[n, d]`` activation (an MLP's hidden layer).

Mixing variables ``v`` in at one site is ``x' = x + Σ_v (x_v - x) B_v B_vᵀ`` (``B_v`` the
variable's orthonormal columns, ``x_v`` its source's activation). When the tail after the
site starts with a plain ``nn.Linear`` (``W``, ``b``), its output on ``x'`` is

    z = (x Wᵀ + b) + [x_1 - x | x_2 - x | ...] @ [B_1 B_1ᵀ Wᵀ ; B_2 B_2ᵀ Wᵀ ; ...]

where the first term and the offsets ``x_v - x`` never change while the rotation trains.
So they are computed once, side by side in one table ``[n, out + V d]``, and a step takes
its rows with one gather and computes ``z`` with one ``addmm`` against a ``[V d, out]``
matrix built from the bases; the backward needs the gradient of that small matrix only,
not of the activation. (Without a plain linear layer first the same table holds ``x`` and
the mix is one ``addmm`` before the tail.) The same numbers as mixing and then running the
layer, up to rounding; the first call is checked against the general path on 16 rows
and, if it differs, the engine says why and keeps the general path.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules import module as module_hooks

from mechscope.core.replay import Replay, error_scale
from mechscope.core.site import Site

log = logging.getLogger("mechscope.causal")
Bases = Callable[[Sequence[str]], "list[Tensor] | None"]  # variables -> each one's basis columns [d, k_v]
MAX_TABLE = 2 ** 28  # elements (1 GiB of float32): beyond that the table would cost more memory than it saves time


def plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose call is exactly ``x Wᵀ + b``: no subclass, no hook, no replaced forward."""
    return (type(module) is nn.Linear and "forward" not in vars(module)
            and not (module._forward_hooks or module._forward_pre_hooks)
            and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks))


class Folded:
    """The table and the modules after the folded layer (see the module docstring)."""

    def __init__(self, state: Replay, variables: Sequence[str], sources: dict[str, Tensor]) -> None:
        x = state.anchor  # [n, d]
        first = state.plan.modules[0][1] if state.plan.modules else None
        self.variables = list(variables)
        self.fold = first is not None and plain_linear(first)
        with torch.no_grad():
            head = F.linear(x, first.weight, first.bias) if self.fold else x  # [n, out]: what the layer computes
            self.table = torch.cat([head, *(sources[v] - x for v in self.variables)], 1).contiguous()
        self.width = head.shape[1]
        self.weight = first.weight if self.fold else None
        self.rest = [m for _, m in state.plan.modules[1 if self.fold else 0:]]
        self.checked = False

    def logits(self, idx: Tensor, bases: list[Tensor]) -> Tensor:
        """The tail's output on rows ``idx`` with the variables mixed in along ``bases``."""
        rows = self.table.index_select(0, idx)  # [batch, out + V d]
        bases = [b.to(rows.dtype) for b in bases]
        if self.fold:
            w_t = self.weight.T.to(rows.dtype)  # [d, out]
            mats = [b @ (b.T @ w_t) for b in bases]  # each [d, out]
        else:
            mats = [b @ b.T for b in bases]  # each [d, d]
        z = torch.addmm(rows[:, :self.width], rows[:, self.width:], torch.cat(mats))  # [batch, out]
        for module in self.rest:  # a plain loop: this runs in every DAS step
            z = module(z)
        return z

    def agrees(self, idx: Tensor, bases: list[Tensor], general: Callable[[Tensor], Tensor],
               readout: Callable[[Tensor], Tensor]) -> str | None:
        """None when the folded path (then ``readout``) gives ``general``'s logits on the first
        16 rows of ``idx``, else why not (then the caller keeps the general path)."""
        few = idx[:16]
        with torch.no_grad():
            got, want = readout(self.logits(few, [b.detach() for b in bases])), general(few)
        if got.shape != want.shape:
            return f"the folded interchange gave shape {list(got.shape)}, the general path {list(want.shape)}"
        err, scale = error_scale(got, want)
        if err > 1e-4 * scale:
            return f"the folded interchange differs from the general path by {err:.3g}"
        return None


def foldable(state: Replay, site: Site, index: Tensor | None, n_variables: int) -> str | None:
    """None when a one-site interchange at ``site`` can be folded, else why not."""
    if state.plan.kind != "chain":
        return f"the tail is a {state.plan.kind} tail, not a chain"
    if state.anchor.dim() != 2 or index is not None or site.heads is not None or site.features is not None:
        return "the site is not a whole [n, d] activation"
    if state.anchor.shape[0] * state.anchor.shape[1] * (n_variables + 1) > MAX_TABLE:
        return f"the table would hold more than {MAX_TABLE} numbers"
    return None
