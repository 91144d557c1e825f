"""Running only the part of a frozen network after a site.

For a frozen model and a fixed site, everything before the site is constant while an
alignment trains: it is computed once (:meth:`TailPlan.precompute`), and each training
step runs only the modules after the site on the intervened activation
(:meth:`TailState.replay`). Two shapes of model are supported, both found from the model
itself and both *verified* against the model's own output before they are trusted:

- **chains**: a probe forward records every leaf module's call; from the site on, each
  leaf must take exactly the previous leaf's output (object identity) and nothing else,
  and the model must return the last leaf's output. ``nn.Sequential`` stacks and the
  zoo MLP are chains.
- **block stacks** (transformers, Hugging Face included): the site is a block's output or
  input (``structure(model)`` finds the blocks, the final norm and the unembedding). The
  precompute run records, with forward pre-hooks, the extra arguments every later block
  receives (attention masks, rotary embeddings, ...); the replay calls the remaining
  blocks with them, then the final norm and the unembedding.

Recorded arguments are sliced to a mini-batch along their first dimension when it is the
data's size. A replay that does not reproduce the model's own logits on unmodified
activations raises :class:`TailError`; callers then fall back to full forwards.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mechscope.core.run import call_model, run
from mechscope.core.site import Site


class TailError(RuntimeError):
    """The part of the model after a site cannot be replayed on its own."""


def output_logits(output: Any) -> Tensor:
    """The logits tensor of a model's output (a tensor, ``.logits``, a dict or a tuple)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TailError(f"cannot find logits in a model output of type {type(output).__name__}")


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


def _hidden(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TailError(f"a block returned {type(out).__name__}, not a tensor or a tuple starting with one")


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


@dataclass
class TailPlan:
    """Which modules run after the anchor (the site's whole activation), and how."""

    model: nn.Module
    anchor: Site  # the site's module, io and element, without positions or features
    kind: str  # "chain" or "blocks"
    modules: list[tuple[str, nn.Module]]  # run in order on the anchor activation
    finals: list[tuple[str, nn.Module]]  # after the blocks: final norm, unembedding

    def describe(self) -> str:
        names = [p for p, _ in self.modules] + [p for p, _ in self.finals]
        return f"{self.kind} tail after {self.anchor.describe()}: {', '.join(names) or '(nothing)'}"

    @torch.no_grad()
    def precompute(self, inputs: Any, verify_rows: int = 16) -> "TailState":
        """One forward over ``inputs``: the anchor activation, later blocks' arguments, logits."""
        inputs = no_cache(self.model, inputs)
        records: list[tuple[tuple, dict]] = []
        handles = []
        if self.kind == "blocks":
            for _, module in self.modules:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs: records.append((args, kwargs)), with_kwargs=True))
        try:
            out, acts = run(self.model, inputs, cache=[self.anchor])
        finally:
            for h in handles:
                h.remove()
        if self.kind == "blocks" and len(records) != len(self.modules):
            raise TailError(f"the blocks after {self.anchor} ran {len(records)} times for {len(self.modules)} blocks; "
                            "a block that runs more than once per forward cannot be replayed")
        anchor = acts[self.anchor]
        state = TailState(self, anchor, records, output_logits(out), int(anchor.shape[0]))
        state.verify(verify_rows)
        return state


@dataclass
class TailState:
    """Precomputed activations and arguments; :meth:`replay` runs the tail on new ones."""

    plan: TailPlan
    anchor: Tensor  # [n, ...] the anchor activation of every example
    records: list[tuple[tuple, dict]]  # per tail block: (args, kwargs) of the precompute call
    logits: Tensor  # [n, ...] the model's own output on the unmodified inputs
    n: int

    def replay(self, act: Tensor, idx: Tensor) -> Tensor:
        """Logits for rows ``idx`` when the anchor activation is ``act`` ([len(idx), ...])."""
        x = act
        if self.plan.kind == "chain":
            for _, module in self.plan.modules:
                x = module(x)
            return x
        for (_, module), (args, kwargs) in zip(self.plan.modules, self.records):
            args, kwargs = slice_rows(args, idx, self.n), slice_rows(kwargs, idx, self.n)
            if args:
                out = module(x, *args[1:], **kwargs)
            else:
                out = module(**{**kwargs, "hidden_states": x})
            x = _hidden(out)
        for _, module in self.plan.finals:
            x = module(x)
        return x

    def verify(self, rows: int) -> None:
        """The replay on unmodified activations must give the model's own logits."""
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(self.n, generator=gen)[: min(rows, self.n)]
        try:
            got = self.replay(self.anchor[idx.to(self.anchor.device)], idx)
        except Exception as e:  # noqa: BLE001 - any failure means the replay is not faithful
            raise TailError(f"replaying {self.plan.describe()} failed: {type(e).__name__}: {e}") from None
        want = self.logits[idx.to(self.logits.device)]
        if got.shape != want.shape:
            raise TailError(f"replaying {self.plan.describe()} gave shape {list(got.shape)}, the model "
                            f"{list(want.shape)}; the model does more after its blocks than the replay knows")
        err = float((got.double() - want.double()).abs().max())
        scale = 1.0 + float(want.double().abs().max())
        if err > 1e-4 * scale:
            raise TailError(f"replaying {self.plan.describe()} differs from the model's own output by {err:.3g}; "
                            "the model's forward does something between or after its blocks that the replay misses")


def plan_tail(model: nn.Module, anchor: Site, example: Any) -> TailPlan:
    """Find the modules after ``anchor`` (a chain, else a block stack); TailError if neither."""
    if anchor.positions is not None or anchor.features is not None or anchor.heads is not None:
        raise TailError("the anchor of a tail is a whole activation: give a site without positions, heads or features")
    chain = _chain_after(model, anchor, example)
    if isinstance(chain, TailPlan):
        return chain
    blocks = _blocks_after(model, anchor, example)
    if isinstance(blocks, TailPlan):
        return blocks
    raise TailError(f"cannot run only the part of {type(model).__name__} after {anchor.describe()}: "
                    f"not a chain ({chain}) and not a block stack ({blocks})")


@torch.no_grad()
def _chain_after(model: nn.Module, anchor: Site, example: Any) -> TailPlan | str:
    """A chain tail, or the reason the model is not a chain after the anchor."""
    leaves = [(p, m) for p, m in model.named_modules() if p and not any(True for _ in m.children())]
    calls: list[tuple[str, nn.Module, tuple, dict, Any]] = []
    handles = [m.register_forward_hook(
        lambda mod, args, kwargs, out, p=p: calls.append((p, mod, args, kwargs, out)), with_kwargs=True)
        for p, m in leaves]
    seen: dict[str, Any] = {}
    target = model.get_submodule(anchor.path)
    if anchor.io == "output":
        handles.append(target.register_forward_hook(lambda mod, args, out: seen.setdefault("act", out)))
    else:
        handles.append(target.register_forward_pre_hook(lambda mod, args: seen.setdefault("act", args)))
    try:
        out = call_model(model, no_cache(model, example))
    finally:
        for h in handles:
            h.remove()
    if len({p for p, *_ in calls}) != len(calls):
        return "a module runs more than once per forward"
    act = seen.get("act")
    if anchor.io == "input":
        act = act[0] if act and anchor.element in (None, 0) else None
    elif anchor.element is not None:
        act = act[anchor.element] if isinstance(act, (tuple, list)) else None
    if not isinstance(act, Tensor):
        return f"the activation at {anchor.describe()} is not the module's plain tensor output or first input"
    own = [i for i, c in enumerate(calls) if c[0] == anchor.path]
    if anchor.io == "output" and own:
        start = own[0] + 1
    elif anchor.io == "output":
        start = next((i + 1 for i, c in enumerate(calls) if c[4] is act), None)
    else:
        start = next((i for i, c in enumerate(calls) if c[2] and c[2][0] is act), None)
    if start is None:
        return f"no leaf module produces or takes the activation at {anchor.describe()} unchanged"
    prev = act
    for path, _, args, kwargs, result in calls[start:]:
        if kwargs or len(args) != 1 or args[0] is not prev:
            return f"module {path!r} does not take exactly the previous module's output"
        prev = result
    if out is not prev:
        return "the model does not return its last module's output"
    return TailPlan(model, anchor, "chain", [(p, m) for p, m, *_ in calls[start:]], [])


def _blocks_after(model: nn.Module, anchor: Site, example: Any) -> TailPlan | str:
    from mechscope.core.structure import StructureError, structure

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
    modules = [(p, model.get_submodule(p)) for p in paths[i:]]
    finals = [(p, model.get_submodule(p)) for p in (s.final_norm, s.unembed) if p]
    return TailPlan(model, anchor, "blocks", modules, finals)


def reference_logits(model: nn.Module, inputs: Any) -> Tensor:
    """The model's own logits on ``inputs`` (no hooks)."""
    with torch.no_grad():
        return output_logits(call_model(model, no_cache(model, inputs)))
