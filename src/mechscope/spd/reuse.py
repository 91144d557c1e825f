"""What the batched masked passes may take from the target's forward instead of recomputing.

The masked copies of a batch run the same frozen, deterministic model on the same
inputs as the target forward, so wherever a copy's input to a module is still the
target's, the module's output is the target's too:

- **the frozen prefix**: modules that finish before the first decomposed layer starts
  see the target's input in every copy (an embedding, the blocks before the first
  decomposed block). Their output is taken from the target forward and repeated over
  the copies; they do not run.
- **decomposed layers on unchanged rows**: in a copy where no replaced layer has run
  yet, a decomposed layer's ``W a + b`` is the target's (used by kept copies and by the
  delta component), and ``V a`` is the inner activation already computed.

Both rest on the execution order of the modules, recorded once per decomposition by core's
recording forward (:func:`mechscope.core.recording.record`, in :func:`reuse_plan`); the first
batched pass that skips the prefix is checked once against a full forward, and a mismatch
(an output the recording misread as per-example) turns the skipping off with a warning.
A module that runs more than once per forward is never part of the prefix (its later
calls see other inputs), and a model with a module in training mode (dropout) gets no
prefix at all.

Cost: the target forward keeps one copy of every prefix module's output (the outermost
ones: for a transformer decomposed in block k, the embedding and blocks 0..k-1), and the
batched forward repeats each over the copies -- the memory of one no-grad forward, for a
forward of the prefix saved in every copy.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import nn

from mechscope.core.recording import prefix_before, record
from mechscope.spd.components import SPDError

_PLANS: "weakref.WeakKeyDictionary[nn.Module, ReusePlan]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ReusePlan:
    rank: dict[str, int]  # decomposed path -> position of its first call among all module calls
    prefix: tuple[str, ...]  # frozen modules (tensor output, one call) done before any decomposed layer starts
    checked: bool = False  # the prefix has been checked once against a full forward

    def unchanged(self, path: str, paths: tuple[str, ...], layerwise: bool) -> list[bool]:
        """Per stacked copy: is ``path``'s input still the target's (no replaced layer ran before it)?

        Copy 0 replaces every layer, copy ``l + 1`` only ``paths[l]``.
        """
        mine = self.rank[path]
        flags = [mine == min(self.rank.values())]
        if layerwise:
            flags += [self.rank[p] >= mine for p in paths]
        return flags


def reuse_plan(model: nn.Module, paths: tuple[str, ...], inputs: Any, rows: int, key: nn.Module) -> ReusePlan:
    """The plan for ``paths`` of ``model`` on batches of ``rows`` examples (cached on ``key``,
    the decomposition), probing once."""
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _probe(model, paths, inputs, rows)
    return plan


def settle_prefix(key: nn.Module, reproduces: bool) -> ReusePlan:
    """Record the one check of ``key``'s prefix; a prefix that did not reproduce the full
    forward is dropped (its modules run in every copy from then on)."""
    plan = _PLANS[key]
    plan = _PLANS[key] = ReusePlan(plan.rank, plan.prefix if reproduces else (), checked=True)
    return plan


def _probe(model: nn.Module, paths: tuple[str, ...], inputs: Any, rows: int) -> ReusePlan:
    """Execution order from one recording forward of every module (core's :func:`record`)."""
    # a module whose forward is already replaced on the instance cannot be wrapped (nor skipped
    # by the batched passes' substitution): it is left out, its children are still recorded
    _, calls = record(model, inputs, [name for name, m in model.named_modules() if name and "forward" not in vars(m)])
    rank: dict[str, int] = {}
    for c in sorted(calls, key=lambda c: c.start):
        if c.path in paths:
            rank.setdefault(c.path, c.start)
    missing = [p for p in paths if p not in rank]
    if missing:
        raise SPDError(f"decomposed module(s) {missing} never ran in the model's forward; decompose modules "
                       "that model.forward uses")
    # a module in training mode (dropout) may give other outputs in every forward
    training = any(m.training for m in model.modules())
    return ReusePlan(rank, () if training else prefix_before(calls, min(rank.values()), rows))
