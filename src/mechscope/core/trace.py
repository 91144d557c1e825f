"""One tiny forward (the structure probe) that records what every module of a model
returns, in what order, and the values that pass through the blocks.

Whether a module returns a tensor or a tuple cannot be read from its class: it changes
between library versions (transformers 5 made GPT-2's block return a plain tensor), so
a site that took ``output[0]`` of a tensor would silently index the batch. The probe
asks the model itself: it runs one forward on a two-token input with the forward of
every module wrapped and records each module's output kind, a short description and the last
dimension of its (first) tensor output. Modules are recorded in the order their forward
*finished*, which is also how the final norm (the norm that runs after the last block)
is told apart from other norms.

The same forward keeps, for every module, a copy of its first tensor input and of its
(first) output tensor and how often it was called: that is what lets
:mod:`mechscope.core.writes` establish what each block adds to the residual stream and
check it, with no forward of its own. Copies, because a module may change its output in
place after returning it (Falcon adds the attention output into the MLP's). On a
two-token input the copies are small (a few MB for a 262k-token vocabulary).

The forward is :func:`mechscope.core.recording.recording` over every module, with copies;
it sees each module's output as its forward returned it, before the module's forward hooks.
The probe leaves no trace: the model runs in eval mode under ``no_grad`` with the RNG
state forked, and every training flag and forward is restored afterwards.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from mechscope.core.recording import recording
from mechscope.core.run import call_model


@dataclass(frozen=True)
class Output:
    """What a module returned in the probe forward."""

    kind: str  # "tensor", "tuple" (a tuple or list whose first element is a tensor) or "other"
    text: str  # e.g. "Tensor[1, 2, 32]" or "tuple(Tensor[1, 2, 32], None)"
    width: int | None  # last dimension of the tensor (of the tuple's first element)


def describe(value: Any) -> str:
    """A short description of a module's output: ``tuple(Tensor[1, 2, 32], None)``."""
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    if value is None:
        return "None"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{type(value).__name__}({inner})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__}({', '.join(str(k) for k in list(value)[:4])})"
    return type(value).__name__


def output_of(value: Any) -> Output:
    """Classify one module output (see :class:`Output`)."""
    if isinstance(value, Tensor):
        return Output("tensor", describe(value), int(value.shape[-1]) if value.dim() else None)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        first = value[0]
        return Output("tuple", describe(value), int(first.shape[-1]) if first.dim() else None)
    return Output("other", describe(value), None)


def default_inputs(model: nn.Module, float_width: int | None = None) -> list[Any]:
    """Inputs to try when none is given: token ids ``[[0, 1]]`` (as ``input_ids=``, then as the
    one argument), then a float batch ``[1, 2, float_width]`` for models without embeddings."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ids = torch.tensor([[0, 1]], device=device)
    tries: list[Any] = []
    try:
        if "input_ids" in inspect.signature(model.forward).parameters:
            tries.append({"input_ids": ids})
    except (TypeError, ValueError):
        pass
    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        tries.append(ids)
    if float_width:
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        tries.append(torch.zeros(1, 2, float_width, device=device, dtype=dtype))
    return tries


@dataclass(frozen=True)
class Trace:
    """What the probe forward saw: per module path, in the order the calls finished."""

    outputs: Mapping[str, Output]  # what each module returned (first call)
    calls: Mapping[str, int]  # how many times each module was called
    inputs: Mapping[str, Tensor]  # copy of each module's first tensor input (first call)
    values: Mapping[str, Tensor]  # copy of each module's (first) output tensor (first call)
    error: str | None = None  # why no input was accepted (then everything else is empty)


def probe(model: nn.Module, inputs: Iterable[Any]) -> Trace:
    """Run ``model`` on the first of ``inputs`` it accepts and trace every module.

    ``inputs`` are tried in turn (a dict is passed as keyword arguments, a tuple as
    positional arguments, anything else as the one argument). When none is accepted the
    trace is empty and ``error`` holds the last failure.
    """
    error = "no probe input to try"
    for example in inputs:
        try:
            return _run(model, example)
        except Exception as e:  # noqa: BLE001 - any failure means "try the next input"
            error = f"{type(e).__name__}: {e}"[:300]
    return Trace({}, {}, {}, {}, error)


def _run(model: nn.Module, example: Any) -> Trace:
    paths = [path for path, _ in model.named_modules()]  # the model itself ("") finishes last
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # wrap_replaced: the probe must also see models whose forwards accelerate has wrapped
        with recording(model, paths, copies=True, wrap_replaced=True) as calls, \
                torch.random.fork_rng(devices=[]), torch.no_grad():
            call_model(model, example)
    finally:
        for m, training in modes.items():
            m.training = training
    seen: dict[str, Output] = {}
    count: dict[str, int] = {}
    ins: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    for c in calls:  # in finish order
        count[c.path] = count.get(c.path, 0) + 1
        if c.path in seen:
            continue
        seen[c.path] = output_of(c.output)
        if c.output_copy is not None:
            values[c.path] = c.output_copy
    for c in sorted(calls, key=lambda c: c.start):  # the first call's input is the one that started first
        if c.path not in ins and c.input_copy is not None:
            ins[c.path] = c.input_copy
    return Trace(seen, count, ins, values)
