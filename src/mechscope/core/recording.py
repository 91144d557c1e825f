"""The recording forward: one forward that keeps, for chosen modules, every call's
arguments, output and when it started and finished.

It runs through :func:`mechscope.core.substitute.substituting` (the module's own forward,
wrapped), not hooks of its own, so hooks and sites on those modules keep working during it
and nothing stays changed after. Three things stand on it: the structure probe
(:mod:`mechscope.core.trace`, every module, with copies), the replays of
:mod:`mechscope.core.replay` (a tail or suffix planned from the recorded calls), and the
reuse of recorded outputs instead of recomputing them (:func:`prefix_before`,
:func:`repeated`: SPD's prefixes).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.run import call_model, find_module, first_output, first_tensor
from mechscope.core.substitute import substituting


class ReplayError(RuntimeError):
    """The part of the model after a site cannot be replayed on its own."""


@dataclass(frozen=True)
class Call:
    """One call of a recorded module. ``start``/``end`` are ticks of one counter that every
    recorded call's start and end advance, so they order calls and tell nesting."""

    path: str
    module: nn.Module
    args: tuple
    kwargs: Mapping[str, Any]
    output: Any  # the object the module returned (not a copy: identity tells a chain)
    start: int
    end: int
    input_copy: Tensor | None = None  # with copies=True: the first tensor argument as it was at the start
    output_copy: Tensor | None = None  # with copies=True: the (first) output tensor as it was at the end


@contextmanager
def recording(model: nn.Module, paths: Iterable[str], *, copies: bool = False,
              wrap_replaced: bool = False) -> Iterator[list[Call]]:
    """Within the block, every call of the modules at ``paths`` is appended (when it
    finishes) to the yielded list; run the model (``run``, ``call_model``) inside.

    ``copies=True`` also keeps a copy of each call's first tensor argument (taken when the
    call starts) and of its (first) output tensor (taken when it returns): a module may
    change a tensor in place after it has been passed on (Falcon adds the attention output
    into the MLP's). A module whose forward is already replaced on the instance
    (accelerate's dispatch hooks, an active substitution) is refused, since a replay
    planned from it would skip the wrapper, unless ``wrap_replaced=True`` (recording only:
    the wrapper runs inside the recorded call).
    """
    calls: list[Call] = []
    tick = itertools.count()

    def recorder(path: str, module: nn.Module) -> Callable[..., Any]:
        def fn(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            start = next(tick)
            x = _copy(first_tensor(args, kwargs)) if copies else None
            out = original(*args, **kwargs)
            y = _copy(first_output(out)) if copies else None
            calls.append(Call(path, module, args, kwargs, out, start, next(tick), x, y))
            return out
        return fn

    modules = {p: find_module(model, p) for p in dict.fromkeys(paths)}
    taken = [p for p, m in modules.items() if "forward" in vars(m)]
    if taken and not wrap_replaced:
        raise ReplayError(f"module(s) {taken[:3]} already have their forward replaced on the instance; "
                          "the recording forward cannot wrap them (full forwards give the same numbers)")
    with substituting(model, {p: recorder(p, m) for p, m in modules.items()}, wrap_replaced=wrap_replaced):
        yield calls


def _copy(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


@torch.no_grad()
def record(model: nn.Module, inputs: Any, paths: Iterable[str]) -> tuple[Any, list[Call]]:
    """One no-grad forward on ``inputs`` recording ``paths``: (model output, calls in finish order)."""
    with recording(model, paths) as calls:
        out = call_model(model, inputs)
    return out, calls


def prefix_before(calls: Sequence[Call], tick: int, rows: int) -> tuple[str, ...]:
    """The outermost modules whose one call finished before ``tick`` with a tensor output of
    ``rows`` rows: later forwards on the same inputs may take those outputs instead of
    running them (a module called twice sees other inputs the second time)."""
    count: dict[str, int] = {}
    for c in calls:
        count[c.path] = count.get(c.path, 0) + 1
    done = [c.path for c in sorted(calls, key=lambda c: c.end) if c.end < tick and count[c.path] == 1
            and isinstance(c.output, Tensor) and c.output.dim() and c.output.shape[0] == rows]
    chosen = set(done)
    # a module inside a chosen one does not run anyway
    return tuple(n for n in done if not any(n.startswith(p + ".") for p in chosen))


def repeated(outputs: Mapping[str, Tensor], n: int) -> dict[str, Callable[..., Any]]:
    """Substitutes (for :func:`substituting`) that return each module's known output
    ``[rows, ...]`` repeated over ``n`` stacked copies of the batch, without running it."""
    def known(out: Tensor) -> Callable[..., Any]:
        return lambda original, *args, **kwargs: out.repeat(n, *([1] * (out.dim() - 1)))
    return {path: known(out) for path, out in outputs.items()}
