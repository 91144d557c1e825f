"""Running a model with interventions at sites: plain forward hooks, always removed.

``hooked(model, interventions, cache=...)`` registers one forward hook (or pre-hook) per
module touched, yields a :class:`Run` whose ``cache`` fills as the model runs, and
removes every hook on exit, also when the body raises. When nothing is intervened on,
the hooks return ``None`` and the model's numerics are untouched (bit-identical).

``run``, ``cache`` and ``interchange`` are one-call conveniences on top of it.
"""

from __future__ import annotations

import difflib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.intervene import Replace
from mechscope.core.site import BatchInfo, Site, SiteError

Intervention = Callable[[Tensor, "HookCall"], Tensor]
Interventions = Mapping[Site, Intervention] | Sequence[tuple[Site, Intervention]]


class NonFiniteActivationError(FloatingPointError):
    """A NaN or inf appeared at a site."""


class _StopForward(Exception):
    """Raised inside a hook to end a forward once every cached site has been read."""


@dataclass(frozen=True)
class HookCall:
    """What an intervention is told about the call it runs in."""

    site: Site
    batch: BatchInfo | None
    index: Tensor | None  # absolute positions [batch, n] or None
    # positional arguments of the module call, for output sites (None at input sites):
    # lets an intervention recompute a module's output from its input (SPD's components)
    args: tuple | None = None


def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that suggests the nearest paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        near = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(n) for n in near)}?" if near else (
            f"the model has {len(names)} modules, e.g. {', '.join(repr(n) for n in names[1:6])}")
        raise SiteError(
            f"no module at path {path!r} in {type(model).__name__}; {hint} "
            "(paths are those of model.named_modules(); `mechscope sites` lists them)"
        ) from None


def first_tensor(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    """The activation a module is called on: its first positional tensor, else
    ``hidden_states=``, else its first tensor keyword argument."""
    for value in args:
        if isinstance(value, Tensor):
            return value
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


def first_output(value: Any) -> Tensor | None:
    """A module output's tensor: the output itself, or a tuple's or list's first element."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)} ({', '.join(_describe(v) for v in value[:4])}{', ...' if len(value) > 4 else ''})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)[:6]}"
    return type(value).__name__


class _OutputSlot:
    """Reads and writes the element of a module's output that a site names."""

    @staticmethod
    def get(output: Any, site: Site) -> Tensor:
        el = site.element
        if el is None:
            if isinstance(output, Tensor):
                return output
            raise SiteError(
                f"site {site.describe()}: module returns {_describe(output)}, not a tensor; "
                "choose the element, e.g. element=0"
            )
        if isinstance(output, Tensor):
            raise SiteError(
                f"site {site.describe()}: module returns a plain {_describe(output)}, not a tuple; "
                "use element=None (indexing it would index the batch)"
            )
        try:
            value = output[el]
        except (IndexError, KeyError, TypeError):
            raise SiteError(f"site {site.describe()}: module returns {_describe(output)}, which has no element {el!r}") from None
        if not isinstance(value, Tensor):
            hint = ("; attention weights are returned only under eager attention: model.set_attn_implementation('eager') "
                    "or aliases.attn_pattern(model, layer), which switches it") if value is None else ""
            raise SiteError(f"site {site.describe()}: element {el!r} of the output is {_describe(value)}, not a tensor{hint}")
        return value

    @staticmethod
    def put(output: Any, site: Site, value: Tensor) -> Any:
        el = site.element
        if el is None:
            return value
        if isinstance(output, tuple):
            return output[:el] + (value,) + output[el + 1:] if el >= 0 else _tuple_set(output, el, value)
        if isinstance(output, list):
            out = list(output)
            out[el] = value
            return out
        output[el] = value  # dict / ModelOutput: mutate in place, it is fresh per call
        return output


def _tuple_set(t: tuple, i: int, v: Any) -> tuple:
    out = list(t)
    out[i] = v
    return tuple(out)


class _InputSlot:
    """Reads and writes the argument of a module's forward that an input site names."""

    @staticmethod
    def locate(module: nn.Module, args: tuple, kwargs: dict, site: Site) -> tuple[str, int | str]:
        el = site.element
        if el is None:
            if args:
                return ("arg", 0)
            el = next(iter(inspect.signature(module.forward).parameters), None)
            if el is None or el not in kwargs:
                raise SiteError(f"site {site.describe()}: the module was called with no arguments to read")
        if isinstance(el, int):
            if -len(args) <= el < len(args):
                return ("arg", el)
            raise SiteError(f"site {site.describe()}: the module got {len(args)} positional argument(s); element {el} does not exist (keyword arguments: {sorted(kwargs)})")
        if el in kwargs:
            return ("kw", el)
        params = list(inspect.signature(module.forward).parameters)
        if el in params and params.index(el) < len(args):
            return ("arg", params.index(el))
        raise SiteError(f"site {site.describe()}: no argument {el!r}; positional: {len(args)}, keyword: {sorted(kwargs)}")


class Run:
    """State of one hooked context: the cache, and the batch for position lookup."""

    def __init__(self, batch: BatchInfo | None = None) -> None:
        self.cache: dict[Site, Tensor] = {}
        self.batch = batch
        self.lead: dict[str, tuple[int, int]] = {}  # rows_of path -> (batch, pos) of its latest call

    def set_batch(self, attention_mask: Tensor | None = None, seq_len: int | None = None) -> None:
        """Tell sites about the current batch (its attention mask) before a forward."""
        if attention_mask is None and seq_len is None:
            self.batch = None
            return
        seq = seq_len if seq_len is not None else attention_mask.shape[1]
        self.batch = BatchInfo(seq_len=seq, attention_mask=attention_mask)

    def __getitem__(self, site: Site) -> Tensor:
        try:
            return self.cache[site]
        except KeyError:
            have = ", ".join(str(s) for s in self.cache) or "nothing"
            raise KeyError(f"site {site} was not cached in this run (cached: {have})") from None


def _check_finite(x: Tensor, site: Site, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise NonFiniteActivationError(
            f"{n_nan} NaN and {n_inf} inf value(s) {what} site {site}; check the inputs, the "
            "intervention's values (a steering coefficient too large?) and the model's weights"
        )


def as_pairs(interventions: Interventions | None) -> list[tuple[Site, Intervention]]:
    """Interventions as a checked list of ``(site, intervention)`` pairs, from a mapping or pairs."""
    if not interventions:
        return []
    items = list(interventions.items()) if isinstance(interventions, Mapping) else list(interventions)
    for site, fn in items:
        if not isinstance(site, Site):
            raise TypeError(f"interventions must be keyed by Site, got {type(site).__name__}: {site!r}")
        if not callable(fn):
            raise TypeError(f"the intervention at {site} is not callable: {fn!r}")
    return items


def _apply(act: Tensor, plan: list[tuple[Site, Intervention | None]], state: Run, check: bool, detach: bool,
           args: tuple | None = None) -> Tensor:
    """Apply every (site, intervention-or-cache) of one hook, in order."""
    for site, fn in plan:
        index = site.resolve_positions(act, state.batch)
        view = site.select(act, index)
        if fn is None:
            if check:
                _check_finite(view, site, "at")
            stored = view.detach() if detach else view
            # an unselected view *is* the activation: copy it, or a later in-place op of
            # the model (ReLU(inplace=True), x += ...) would silently rewrite the cache
            state.cache[site] = stored.clone() if view is act else stored
            continue
        new = fn(view, HookCall(site, state.batch, index, args))
        if not isinstance(new, Tensor) or new.shape != view.shape:
            raise SiteError(
                f"the intervention at site {site} returned {_describe(new)}, but the site's view "
                f"has shape {list(view.shape)}; an intervention must return a tensor of the same shape"
            )
        if check:
            _check_finite(new, site, "written by the intervention at")
        act = site.scatter(act, index, new.to(act.dtype))
    return act


@contextmanager
def hooked(
    model: nn.Module,
    interventions: Interventions | None = None,
    cache: Iterable[Site] = (),
    *,
    batch: BatchInfo | None = None,
    check_finite: bool = True,
    detach: bool = True,
    stop_when_cached: bool = False,
) -> Iterator[Run]:
    """Register hooks for ``interventions`` and ``cache`` on ``model``; remove them on exit.

    Within one module, sites apply in the order given (interventions first, then cache
    reads, which therefore see the intervened values). ``stop_when_cached`` ends the
    forward (inside ``run``/``cache``) as soon as every cached site has been read, so
    the layers after the deepest site are never run.
    """
    items: list[tuple[Site, Intervention | None]] = as_pairs(interventions)
    cache_sites = list(dict.fromkeys(cache))
    items += [(s, None) for s in cache_sites]
    state = Run(batch)
    groups: dict[tuple, list[tuple[Site, Intervention | None]]] = {}
    for site, fn in items:
        groups.setdefault(site.module_key, []).append((site, fn))
    want = set(cache_sites)

    def finish() -> None:
        if stop_when_cached and want and want.issubset(state.cache):
            raise _StopForward

    handles = []
    try:
        for path in {site.rows_of for site, _ in items if site.rows_of is not None}:
            handles.append(find_module(model, path).register_forward_pre_hook(_lead_hook(path, state), with_kwargs=True))
        for (path, io, _, _), plan in groups.items():
            module = find_module(model, path)
            if io == "output":
                handles.append(module.register_forward_hook(_output_hook(plan, state, check_finite, detach, finish)))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(plan, state, check_finite, detach, finish), with_kwargs=True))
        yield state
    finally:
        for h in handles:
            h.remove()


def _lead_hook(path: str, state: Run):
    """Records (batch, pos) of the activation a block is called on, for sites inside it
    whose module sees flattened rows."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = first_tensor(args, kwargs)
        if x is None or x.dim() < 3:
            raise SiteError(f"module {path!r} (rows_of= of a site) was called without a [batch, pos, ...] tensor, "
                            f"so the flattened rows inside it cannot be given their batch and positions")
        state.lead[path] = (int(x.shape[0]), int(x.shape[1]))
    return hook


def _apply_rows(act: Tensor, plan: list, state: Run, check: bool, detach: bool, args: tuple | None = None) -> Tensor:
    """:func:`_apply` on ``[batch, pos, ...]``, for a module that runs on flattened rows."""
    site = plan[0][0]
    if site.rows_of is None:
        return _apply(act, plan, state, check, detach, args)
    lead = state.lead.get(site.rows_of)
    if lead is None or act.shape[0] != lead[0] * lead[1]:
        raise SiteError(f"site {site.describe()}: expected flattened rows [batch*pos, ...] of the input of "
                        f"{site.rows_of!r} ({lead}), got {_describe(act)}")
    new = _apply(act.unflatten(0, lead), plan, state, check, detach, args)
    return new.flatten(0, 1)


def _output_hook(plan, state: Run, check: bool, detach: bool, finish: Callable[[], None]):
    changes = any(fn is not None for _, fn in plan)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        site = plan[0][0]
        act = _OutputSlot.get(output, site)
        new = _apply_rows(act, plan, state, check, detach, args)
        finish()
        return _OutputSlot.put(output, site, new) if changes else None

    return hook


def _input_hook(plan, state: Run, check: bool, detach: bool, finish: Callable[[], None]):
    changes = any(fn is not None for _, fn in plan)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        site = plan[0][0]
        kind, key = _InputSlot.locate(module, args, kwargs, site)
        act = args[key] if kind == "arg" else kwargs[key]
        if not isinstance(act, Tensor):
            raise SiteError(f"site {site.describe()}: the argument is {_describe(act)}, not a tensor")
        new = _apply_rows(act, plan, state, check, detach)
        finish()
        if not changes:
            return None
        if kind == "arg":
            args = args[:key] + (new,) + args[key + 1:] if key >= 0 else _tuple_set(args, key, new)
        else:
            kwargs = {**kwargs, key: new}
        return args, kwargs

    return hook


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple of positional args, or a dict of keyword args."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def logits_of(output: Any) -> Any:
    """A model output's logits: ``output.logits`` (Hugging Face), else the output itself."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else output


def batch_info(inputs: Any) -> BatchInfo | None:
    """Position context of a model input: its attention mask when it has one."""
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        mask = inputs["attention_mask"]
        return BatchInfo(seq_len=mask.shape[1], attention_mask=mask)
    return None


def run(
    model: nn.Module,
    inputs: Any,
    interventions: Interventions | None = None,
    cache: Iterable[Site] = (),
    **options: Any,
) -> tuple[Any, dict[Site, Tensor]]:
    """One forward of ``model`` on ``inputs`` with interventions; returns (output, cache).

    The output is ``None`` when ``stop_when_cached=True`` ended the forward early.
    """
    options.setdefault("batch", batch_info(inputs))
    with hooked(model, interventions, cache, **options) as state:
        try:
            output = call_model(model, inputs)
        except _StopForward:
            output = None
    return output, state.cache


def cache(model: nn.Module, inputs: Any, sites: Iterable[Site], **options: Any) -> dict[Site, Tensor]:
    """Activations at ``sites`` (their views), stopping the forward after the deepest one."""
    sites = list(sites)
    if not sites:
        raise ValueError("cache() needs at least one site")
    options.setdefault("stop_when_cached", True)
    _, acts = run(model, inputs, cache=sites, **options)
    missing = [str(s) for s in sites if s not in acts]
    if missing:
        raise SiteError(f"sites {missing} were never reached by the forward pass; is the module used by model.forward?")
    return acts


def interchange(
    model: nn.Module,
    base: Any,
    source: Any,
    sites: Sequence[Site],
    **options: Any,
) -> Any:
    """Run ``base`` with each site's view replaced by its value on ``source``.

    Base and source are separate batches (collated and padded separately); positions
    are resolved in each against its own attention mask.
    """
    src = cache(model, source, sites, check_finite=options.get("check_finite", True))
    out, _ = run(model, base, [(s, Replace(src[s])) for s in sites], **options)
    return out
