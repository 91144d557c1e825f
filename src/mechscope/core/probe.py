"""One tiny forward that records what every module of a model returns, and in what order.

Whether a module returns a tensor or a tuple cannot be read from its class: it changes
between library versions (transformers 5 made GPT-2's block return a plain tensor), so
a site that took ``output[0]`` of a tensor would silently index the batch. The probe
asks the model itself: it runs one forward on a two-token input with a forward hook on
every module and records each module's output kind, a short description and the last
dimension of its (first) tensor output. Modules are recorded in the order their forward
*finished*, which is also how the final norm (the norm that runs after the last block)
is told apart from other norms.

The probe leaves no trace: the model runs in eval mode under ``no_grad`` with the RNG
state forked, and every training flag and hook is restored afterwards.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn


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


def probe(model: nn.Module, inputs: Iterable[Any]) -> tuple[dict[str, Output], str | None]:
    """Run ``model`` on the first of ``inputs`` it accepts; record every module's output.

    ``inputs`` are tried in turn (a dict is passed as keyword arguments, a tuple as
    positional arguments, anything else as the one argument). Returns the outputs of
    the modules that ran, keyed by path in the order they finished, and ``None``; or
    an empty dict and the last error when no input was accepted.
    """
    error = "no probe input to try"
    for example in inputs:
        try:
            return _run(model, example), None
        except Exception as e:  # noqa: BLE001 - any failure means "try the next input"
            error = f"{type(e).__name__}: {e}"[:300]
    return {}, error


def _run(model: nn.Module, example: Any) -> dict[str, Output]:
    seen: dict[str, Output] = {}
    handles = []

    def record(path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if path not in seen:
                seen[path] = output_of(output)
        return hook

    modes = {m: m.training for m in model.modules()}
    try:
        for path, module in model.named_modules():  # the model itself ("") finishes last
            handles.append(module.register_forward_hook(record(path)))
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if isinstance(example, Mapping):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return seen
