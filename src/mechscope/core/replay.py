"""Replaying part of a model from a recorded point.

Several methods run a frozen model many times on inputs whose beginning never changes:
DAS trains a rotation at one site (everything before the site is constant) and activation
patching writes one cell into the base run (everything before the cell is the base run's).
Both replay the part of the model after an anchor site on a new anchor activation
(:func:`plan_tail`, :meth:`Tail.precompute`, :meth:`Replay.replay`), planned from one
recording forward (:mod:`mechscope.core.recording`). Two tail shapes are found from the
model itself: a *chain* (from the anchor on, each leaf module takes exactly the previous
one's output and the model returns the last's) and a *block stack* (the anchor is a block's
input or output; later blocks get the extra arguments they were called with in the recorded
forward, then the final norm and unembedding). A tail is verified against the model's own
output before it is trusted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.recording import Call, ReplayError, record, recording
from mechscope.core.run import call_model, logits_of, run
from mechscope.core.site import Site
from mechscope.core.structure import StructureError, structure

# ------------------------------------------------------------------------------ helpers


def output_logits(output: Any) -> Tensor:
    """The logits tensor of a model's output (a tensor, ``.logits``, a dict or a tuple), or an error:
    a replay must compare tensors, where a metric may take whatever the model returns."""
    logits = logits_of(output)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ReplayError(f"cannot find logits in a model output of type {type(output).__name__}")


def kept_positions(inputs: Any, t: int) -> list[int] | None:
    """The positions a ``logits_to_keep`` in ``inputs`` keeps (None: every position), as the
    model returns their logits (Hugging Face: an int keeps the last ones, a 1-D tensor those)."""
    keep = inputs.get("logits_to_keep") if isinstance(inputs, Mapping) else None
    if keep is None or (isinstance(keep, int) and keep == 0):
        return None
    if isinstance(keep, int):
        return list(range(t - keep, t))
    if isinstance(keep, Tensor) and keep.dim() == 1:
        return [int(p) % t for p in keep.tolist()]
    raise ReplayError(f"logits_to_keep must be an int or a 1-D tensor of positions here, got {keep!r}")


def no_cache(model: nn.Module, inputs: Any) -> Any:
    """Inputs with ``use_cache=False`` for models that take it (a KV cache must not be replayed)."""
    if isinstance(inputs, Mapping) and "use_cache" not in inputs:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return inputs
        if "use_cache" in params:
            return {**inputs, "use_cache": False}
    return inputs


def slice_rows(value: Any, idx: Tensor, n: int) -> Any:
    """``value`` restricted to rows ``idx`` wherever its first dimension is the data size ``n``."""
    if isinstance(value, Tensor):
        return value[idx.to(value.device)] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, tuple):
        return tuple(slice_rows(v, idx, n) for v in value)
    if isinstance(value, list):
        return [slice_rows(v, idx, n) for v in value]
    if isinstance(value, dict):
        return {k: slice_rows(v, idx, n) for k, v in value.items()}
    return value


def error_scale(got: Tensor, want: Tensor) -> tuple[float, float]:
    """(max |got - want|, 1 + max |want|) in float64: a replay reproduces the model's output
    when the first is at most ~1e-4 times the second (float rounding, not a bug)."""
    return float((got.double() - want.double()).abs().max()), 1.0 + float(want.double().abs().max())


def chain(modules: Iterable[nn.Module], x: Tensor) -> Tensor:
    """Each module on the previous one's output."""
    for module in modules:
        x = module(x)
    return x


def _hidden(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ReplayError(f"a block returned {type(out).__name__}, not a tensor or a tuple starting with one")


# ------------------------------------------------------------------------------ tails


@dataclass(frozen=True)
class Tail:
    """Which modules run after the anchor (a site's whole activation), and how."""

    model: nn.Module
    anchor: Site  # the site's module, io and element, without positions or features
    kind: str  # "chain" or "blocks"
    modules: tuple[tuple[str, nn.Module], ...]  # run in order on the anchor activation
    finals: tuple[tuple[str, nn.Module], ...] = ()  # after the blocks: final norm, unembedding

    def describe(self) -> str:
        names = [p for p, _ in self.modules] + [p for p, _ in self.finals]
        return f"{self.kind} tail after {self.anchor.describe()}: {', '.join(names) or '(nothing)'}"

    @torch.no_grad()
    def precompute(self, inputs: Any, verify_rows: int = 16) -> "Replay":
        """One forward over ``inputs``: the anchor activation, later blocks' arguments, logits."""
        inputs = no_cache(self.model, inputs)
        paths = [p for p, _ in self.modules] if self.kind == "blocks" else []
        with recording(self.model, paths) as calls:
            out, acts = run(self.model, inputs, cache=[self.anchor])
        if len(calls) != len(paths):
            raise ReplayError(f"the blocks after {self.anchor} ran {len(calls)} times for {len(paths)} blocks; "
                              "a block that runs more than once per forward cannot be replayed")
        records = tuple((c.args, c.kwargs) for c in sorted(calls, key=lambda c: c.start))
        anchor = acts[self.anchor]
        # a model asked for some positions' logits only: the replay reads the same ones
        keep = kept_positions(inputs, anchor.shape[1]) if anchor.dim() >= 2 else None
        state = Replay(self, anchor, records, output_logits(out), int(anchor.shape[0]),
                       None if keep is None else tuple(keep))
        state.verify(verify_rows)
        return state


@dataclass(frozen=True)
class Replay:
    """A tail with its precomputed anchor activation and recorded block arguments."""

    plan: Tail
    anchor: Tensor  # [n, ...] the anchor activation of every example
    records: tuple[tuple[tuple, Mapping[str, Any]], ...]  # per tail block: (args, kwargs) of its recorded call
    logits: Tensor  # [n, ...] the model's own output on the unmodified inputs
    n: int
    keep: tuple[int, ...] | None = None  # the positions whose logits the model returns (logits_to_keep)

    def replay(self, act: Tensor, idx: Tensor, readout: Sequence[int] | None = None) -> Tensor:
        """Logits for rows ``idx`` when the anchor activation is ``act`` ([len(idx), ...]);
        with ``readout``, at those positions only ([rows, len(readout), ...]): a block stack
        then runs its final norm and unembedding there only. Where the inputs carried
        ``logits_to_keep``, positions index the kept ones, as in the model's own output."""
        if self.keep is not None:
            readout = list(self.keep) if readout is None else [self.keep[r] for r in readout]
        x = act
        if self.plan.kind == "chain":
            for _, module in self.plan.modules:  # a plain loop: this runs in every DAS step
                x = module(x)
            return x if readout is None else x[:, list(readout)]
        for (_, module), (args, kwargs) in zip(self.plan.modules, self.records):
            args, kwargs = slice_rows(args, idx, self.n), slice_rows(kwargs, idx, self.n)
            # the recorded first argument is the old anchor-derived activation: x replaces it
            x = _hidden(module(x, *args[1:], **kwargs) if args else module(**{**kwargs, "hidden_states": x}))
        if readout is not None:
            x = x[:, list(readout)]  # [rows, n_readout, d_model]
        return chain((m for _, m in self.plan.finals), x)

    def later(self, site: Site, act: Tensor) -> "Replay":
        """The replay from a later block site of the same stack, whose base activation is
        ``act``: the same recorded arguments, fewer blocks (no forward of its own)."""
        paths = [p for p, _ in self.plan.modules]
        k = paths.index(site.path) + (1 if site.io == "output" else 0)
        plan = Tail(self.plan.model, site, "blocks", self.plan.modules[k:], self.plan.finals)
        return Replay(plan, act, self.records[k:], self.logits, self.n, self.keep)

    def verify(self, rows: int) -> None:
        """The replay on unmodified activations must give the model's own logits."""
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(self.n, generator=gen)[: min(rows, self.n)]
        try:
            got = self.replay(self.anchor[idx.to(self.anchor.device)], idx)
        except Exception as e:  # noqa: BLE001 - any failure means the replay is not faithful
            raise ReplayError(f"replaying {self.plan.describe()} failed: {type(e).__name__}: {e}") from None
        want = self.logits[idx.to(self.logits.device)]
        if got.shape != want.shape:
            raise ReplayError(f"replaying {self.plan.describe()} gave shape {list(got.shape)}, the model "
                              f"{list(want.shape)}; the model does more after its blocks than the replay knows")
        err, scale = error_scale(got, want)
        if err > 1e-4 * scale:
            raise ReplayError(f"replaying {self.plan.describe()} differs from the model's own output by {err:.3g}; "
                              "the model's forward does something between or after its blocks that the replay misses")


def plan_tail(model: nn.Module, anchor: Site, example: Any) -> Tail:
    """Find the modules after ``anchor`` (a chain, else a block stack); ReplayError if neither."""
    if anchor.positions is not None or anchor.features is not None or anchor.heads is not None:
        raise ReplayError("the anchor of a tail is a whole activation: "
                          "give a site without positions, heads or features")
    found = _chain_after(model, anchor, example)
    if isinstance(found, Tail):
        return found
    blocks = _blocks_after(model, anchor, example)
    if isinstance(blocks, Tail):
        return blocks
    raise ReplayError(f"cannot run only the part of {type(model).__name__} after {anchor.describe()}: "
                      f"not a chain ({found}) and not a block stack ({blocks})")


def _anchor_act(calls: Sequence[Call], anchor: Site) -> Tensor | None:
    """The activation at ``anchor`` in a recorded forward: the first call's output (or its
    element), or its first positional argument."""
    own = [c for c in calls if c.path == anchor.path]
    if not own:
        return None
    if anchor.io == "input":
        args = min(own, key=lambda c: c.start).args
        return args[0] if args and anchor.element in (None, 0) else None
    act = own[0].output
    if anchor.element is not None:
        act = act[anchor.element] if isinstance(act, (tuple, list)) else None
    return act


def _chain_after(model: nn.Module, anchor: Site, example: Any) -> Tail | str:
    """A chain tail, or the reason the model is not a chain after the anchor."""
    leaves = [p for p, m in model.named_modules() if p and not any(True for _ in m.children())]
    try:
        out, recorded = record(model, no_cache(model, example), [*leaves, anchor.path])
    except ReplayError as e:
        return str(e)
    act = _anchor_act(recorded, anchor)
    is_leaf = set(leaves)
    calls = [c for c in recorded if c.path in is_leaf]  # in the order they finished
    if len({c.path for c in calls}) != len(calls):
        return "a module runs more than once per forward"
    if not isinstance(act, Tensor):
        return f"the activation at {anchor.describe()} is not the module's plain tensor output or first input"
    own = [i for i, c in enumerate(calls) if c.path == anchor.path]
    if anchor.io == "output" and own:
        start = own[0] + 1
    elif anchor.io == "output":
        start = next((i + 1 for i, c in enumerate(calls) if c.output is act), None)
    else:
        start = next((i for i, c in enumerate(calls) if c.args and c.args[0] is act), None)
    if start is None:
        return f"no leaf module produces or takes the activation at {anchor.describe()} unchanged"
    prev = act
    for c in calls[start:]:
        if c.kwargs or len(c.args) != 1 or c.args[0] is not prev:
            return f"module {c.path!r} does not take exactly the previous module's output"
        prev = c.output
    if out is not prev:
        return "the model does not return its last module's output"
    return Tail(model, anchor, "chain", tuple((c.path, c.module) for c in calls[start:]))


def _blocks_after(model: nn.Module, anchor: Site, example: Any) -> Tail | str:
    """A block-stack tail (``structure`` finds the blocks, final norm, unembedding), or why not."""
    try:  # the cached structure (the user's overrides included), else one probed on this input
        s = structure(model)
    except (StructureError, TypeError, ValueError):
        try:
            s = structure(model, example=no_cache(model, example))
        except (StructureError, TypeError, ValueError) as e:
            return f"no structure found: {e}"
    if not s.blocks_path or not s.n_layers:
        return "no block list found"
    paths = [b.path for b in s.blocks]
    if anchor.path not in paths:
        return f"{anchor.path!r} is not one of the blocks {paths[0]}..{paths[-1]}"
    if anchor.element not in (None, 0, "hidden_states"):
        return f"element {anchor.element!r} of a block is not its hidden state"
    if s.unembed is None:
        return "no unembedding found"
    i = paths.index(anchor.path) + (1 if anchor.io == "output" else 0)
    modules = tuple((p, model.get_submodule(p)) for p in paths[i:])
    finals = tuple((p, model.get_submodule(p)) for p in (s.final_norm, s.unembed) if p)
    return Tail(model, anchor, "blocks", modules, finals)


def reference_logits(model: nn.Module, inputs: Any) -> Tensor:
    """The model's own logits on ``inputs`` (no hooks)."""
    with torch.no_grad():
        return output_logits(call_model(model, no_cache(model, inputs)))
