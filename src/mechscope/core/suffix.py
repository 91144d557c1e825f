"""Suffix replays: a model's blocks from position ``s`` on, with the base run's keys and values.

In a causal transformer, changing the residual stream at position ``p`` before block ``l``
changes nothing at positions ``< p`` of any later block: their keys and values are the base
run's. So a patch there needs only positions ``>= p`` of blocks ``l ..`` attending to the
base run's keys and values for the earlier positions (what a KV cache does), and the final
norm and unembedding at the positions a metric reads (logits read before ``p`` are the base
run's own). One mechanism, two ways to run a block on a suffix, found from the model:

- ``"forward_from"``: every block offers ``forward_from(x, past, key_mask, queries)`` and
  keeps its keys and values at ``attn.k`` / ``attn.v`` (the built-in transformer); the base
  run caches those sites, the final norm and unembedding come from
  :func:`~mechscope.core.structure.structure` (the user's overrides included), and
  copies of the batch that start at different blocks join the batch at their block.
- ``"kv cache"``: a Hugging Face causal LM (its forward takes ``cache`` or
  ``past_key_values`` and ``use_cache``). The base run fills a full-length ``DynamicCache``;
  a replay calls the model's own forward on the suffix with that cache cut at ``s``, the
  blocks before the start block substituted (:mod:`mechscope.core.substitute`) and the
  start block fed the new activation, so masks (padding, sliding windows), position
  embeddings, soft-capping and ``logits_to_keep`` are the model's own code.

:func:`plan_suffix` runs the base forward once and checks a replay of the unmodified base
activation against the model's own logits before anything is trusted; where it cannot
(another model, unknown inputs, a hook that changes a block) it returns the reason instead,
and the caller says which path it took.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.replay import chain, error_scale, kept_positions, output_logits
from mechscope.core.run import logits_of, run
from mechscope.core.site import Site
from mechscope.core.structure import ModelStructure, structure
from mechscope.core.substitute import substituting

Entries = Sequence[tuple[int, Tensor]]  # (start block, x [copies*batch, t - s, d_model]), sorted by block
# writes inside the replayed blocks, per entry (its index in Entries): (module path, fn) where fn
# takes that entry's rows of the module's input [rows, t - s, ...] and returns their new value
Inside = Mapping[int, Sequence[tuple[str, Callable[[Tensor], Tensor]]]]
_ZOO_INPUTS = {"input_ids", "attention_mask", "position_ids"}
_HF_INPUTS = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "logits_to_keep"}


def start_block(s: ModelStructure, site: Site) -> int | None:
    """The first block a patch at ``site`` feeds (``n_layers``: only the final norm and
    unembedding), or None when ``site`` is not a whole block input or output."""
    if site.heads is not None or site.features is not None or site.positions is not None:
        return None
    paths = [b.path for b in s.blocks]
    if site.path not in paths:
        return None
    layer = paths.index(site.path)
    if site.io == "input" and site.element in (None, 0, "x", "hidden_states"):
        return layer
    if site.io == "output" and site.element in (None, 0):
        return layer + 1
    return None


def has_forward_from(model: nn.Module, s: ModelStructure) -> bool:
    """Whether every block of ``s`` offers ``forward_from`` and its keys / values at ``attn.k`` / ``attn.v``."""
    blocks = [model.get_submodule(b.path) for b in s.blocks]
    return bool(blocks) and all(callable(getattr(b, "forward_from", None)) and isinstance(getattr(b, "attn", None), nn.Module)
                                and hasattr(b.attn, "k") and hasattr(b.attn, "v") for b in blocks)


def kv_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a Hugging Face KV cache (None: it takes none)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "use_cache" not in params or "transformers.cache_utils" not in sys.modules:
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def keeps_logits(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (it then unembeds only those positions)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def as_dict(model: nn.Module, inputs: Any) -> dict[str, Any] | None:
    """A tensor input as ``{first forward argument: tensor}``; a dict unchanged; else None."""
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if isinstance(inputs, Tensor):
        return {next(iter(inspect.signature(model.forward).parameters)): inputs}
    return None


@dataclass
class Suffix:
    """The base run, as suffix replays need it (build it with :func:`plan_suffix`)."""

    model: nn.Module
    kind: str  # "forward_from" or "kv cache"
    block_paths: tuple[str, ...]
    read: tuple[int, ...]  # absolute positions whose logits the metric reads, in its order
    logits: Tensor  # [batch, len(read), vocab] the base run's own logits there
    kv: list[tuple[Tensor, Tensor]]  # per block: the base run's keys and values
    inputs: dict[str, Any]  # the base input (its per-position tensors are cut at s)
    t: int
    finals: tuple[nn.Module, ...] = ()  # forward_from: final norm, unembedding
    kv_arg: str = "cache"
    cache_type: Any = None
    after_blocks: str | None = None  # kv cache: the module the last block's output enters (final norm, unembedding)
    # kv cache: position-wise modules of the last block (query and output projections, MLP),
    # run at the read positions only: its other positions' outputs are never read
    pointwise: tuple[str, ...] = ()
    blocks: tuple[nn.Module, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = tuple(self.model.get_submodule(p) for p in self.block_paths)

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    def rows(self, idx: Tensor) -> "Suffix":
        """The same state for examples ``idx`` only (their keys, values, inputs and logits):
        verification replays the first example, DAS's suffix engine a minibatch."""
        def pick(v: Any) -> Any:  # per-example tensors only; the rest is shared
            if isinstance(v, Tensor) and v.dim() and v.shape[0] == self.batch:
                return v.index_select(0, idx.to(v.device))
            return v
        return replace(self, logits=pick(self.logits), kv=[(pick(k), pick(v)) for k, v in self.kv],
                       inputs={n: pick(v) for n, v in self.inputs.items()})

    def logits_from(self, entries: Entries, s: int, inside: Inside | None = None) -> Tensor:
        """Logits at ``read`` of copies of the batch patched at positions >= ``s``: [rows, len(read), vocab].

        ``entries``: (block, x) sorted by block, ``x`` [copies*batch, t - s, d_model] the residual
        stream entering ``block`` (``n_layers``: the final norm) at positions s..; rows come out
        in the order of ``entries``. ``inside``: writes into the input of modules of the replayed
        blocks (one head's slice of the attention output, ...), each on its entry's rows only;
        such a module must run once per block on positions s.. (the output projection does)."""
        b = self.batch
        rows = sum(e.shape[0] for _, e in entries)
        late = [r for r in self.read if r >= s]
        if not late:  # a patch at s or later cannot reach an earlier position
            return self.logits.repeat(rows // b, 1, 1)
        queries = torch.tensor([r - s for r in late], dtype=torch.long)
        inside = inside or {}
        if self.kind == "forward_from":
            new = self._forward_from(entries, s, queries, inside)
        else:
            new = torch.cat([self._kv_group(block, x, s, queries, inside.get(e, ()))
                             for e, (block, x) in enumerate(entries)])
        if len(late) == len(self.read):
            return new
        early = [n for n, r in enumerate(self.read) if r < s]
        old = self.logits[:, early].repeat(rows // b, 1, 1)  # unchanged by the patch
        order = early + [n for n, r in enumerate(self.read) if r >= s]  # where each column of cat belongs
        return torch.cat([old, new], 1)[:, torch.tensor(order).argsort()]

    def _forward_from(self, entries: Entries, s: int, queries: Tensor, inside: Inside) -> Tensor:
        b, n_blocks = self.batch, len(self.blocks)
        mask = self.inputs.get("attention_mask")
        offsets = [0]  # entries join the batch in their order: entry e's rows start at offsets[e]
        for _, e in entries:
            offsets.append(offsets[-1] + e.shape[0])
        writes = {e: [(path, offsets[e], offsets[e + 1], fn) for path, fn in w] for e, w in inside.items()}
        last_written = any(path.startswith(self.block_paths[-1] + ".") for w in inside.values() for path, _ in w)
        x = None
        with substituting(self.model, _writes_at(writes)):
            for j in range(entries[0][0], n_blocks + 1):
                new = [e if j < n_blocks or last_written else e[:, queries] for blk, e in entries if blk == j]
                if new:
                    x = torch.cat(([] if x is None else [x]) + new) if len(new) > 1 or x is not None else new[0]
                if j < n_blocks:
                    k, v = self.kv[j]
                    key_mask = None if mask is None else mask.repeat(x.shape[0] // b, 1)  # [rows, pos]
                    # a write inside the last block needs its module on every position: all of them run
                    x = self.blocks[j].forward_from(x, (k[:, :s], v[:, :s]), key_mask,
                                                    queries if j == n_blocks - 1 and not last_written else None)
        if last_written:
            x = x[:, queries]
        return chain(self.finals, x)  # [rows, len(queries), vocab]

    def _kv_group(self, block: int, x: Tensor, s: int, queries: Tensor,
                  inside: Sequence[tuple[str, Callable[[Tensor], Tensor]]] = ()) -> Tensor:
        """One call of the model's own forward on positions s.. of ``x.shape[0] // batch``
        copies, from block ``block`` on (the blocks before it pass their input through),
        with ``inside``'s writes."""
        n_blocks, c = len(self.blocks), x.shape[0] // self.batch
        cache = self.cache_type()
        for j, (k, v) in enumerate(self.kv):  # blocks before ``block`` never read theirs: one copy
            reps = (c, 1, 1, 1) if j >= block else (1, 1, 1, 1)
            cache.update(k[:, :, :s].repeat(*reps), v[:, :, :s].repeat(*reps), j)
        inputs: dict[str, Any] = {self.kv_arg: cache, "use_cache": True}
        for name, value in self.inputs.items():
            if name == "attention_mask":  # covers the past and the new positions
                inputs[name] = value.repeat(c, *([1] * (value.dim() - 1)))
            elif name in ("input_ids", "inputs_embeds", "position_ids"):
                inputs[name] = value[:, s:].repeat(c, *([1] * (value.dim() - 1)))
        if "position_ids" not in inputs:
            inputs["position_ids"] = torch.arange(s, self.t, device=x.device)[None]
        if keeps_logits(self.model):
            inputs["logits_to_keep"] = queries.to(x.device)
        subs = {p: _passing for p in self.block_paths[:block]}
        if block < n_blocks:
            subs[self.block_paths[block]] = _feeding(x)
            subs.update({p: _at_rows(queries.to(x.device)) for p in self.pointwise})
        elif self.after_blocks:  # only the final norm and unembedding, fed x (after any hook on the last block)
            subs[self.after_blocks] = _feeding(x)
        else:
            subs[self.block_paths[-1]] = lambda original, *a, **kw: x
        for path, fn in _writes_at({0: [(path, 0, x.shape[0], fn) for path, fn in inside]}).items():
            # written first, then (in the last block) run at the read positions only
            subs[path] = fn if path not in subs else _then(fn, subs[path])
        with substituting(self.model, subs):
            logits = output_logits(self.model(**inputs))
        return logits if keeps_logits(self.model) else logits[:, queries]


Write = tuple[str, int, int, Callable[[Tensor], Tensor]]  # (module path, first row, end row, fn)


def _writes_at(writes: Mapping[int, Sequence[Write]]) -> dict[str, Any]:
    """Substitutes that write into a module's input: per path, each entry's rows first..end
    of the input replaced by ``fn`` of them."""
    by_path: dict[str, list[tuple[int, int, Callable[[Tensor], Tensor]]]] = {}
    for w in writes.values():
        for path, first, end, fn in w:
            by_path.setdefault(path, []).append((first, end, fn))

    def writer(parts: list[tuple[int, int, Callable[[Tensor], Tensor]]]) -> Any:
        def sub(original: Any, x: Tensor, *args: Any, **kwargs: Any) -> Any:
            x = x.clone()
            for first, end, fn in parts:
                x[first:end] = fn(x[first:end])
            return original(x, *args, **kwargs)
        return sub
    return {path: writer(parts) for path, parts in by_path.items()}


def _then(first: Any, second: Any) -> Any:
    """Two substitutes of one module: ``first``'s write, then ``second`` on the written input."""
    return lambda original, *args, **kwargs: first(lambda *a, **k: second(original, *a, **k), *args, **kwargs)


def _passing(original: Any, *args: Any, **kwargs: Any) -> Tensor:
    """A block before the start block: its input, unchanged (its output is replaced anyway)."""
    return args[0] if args else kwargs["hidden_states"]


def _at_rows(queries: Tensor) -> Any:
    """A position-wise module run at ``queries`` only (dim 1 of its input); zeros elsewhere."""
    def fn(original: Any, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.dim() < 3 or args or kwargs:
            return original(x, *args, **kwargs)
        some = original(x[:, queries])
        if not isinstance(some, Tensor):  # e.g. an MoE block returning (output, router logits)
            return original(x)
        out = some.new_zeros(*x.shape[:2], *some.shape[2:])
        out[:, queries] = some
        return out
    return fn


def _pointwise(s: ModelStructure) -> tuple[str, ...]:
    last = s.blocks[-1]
    q = last.qkv[0] if last.qkv else None
    return tuple(p for p in (q, last.attn_out_proj, last.mlp) if p)


def _feeding(x: Tensor) -> Any:
    def fn(original: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            return original(x, *args[1:], **kwargs)
        return original(**{**kwargs, "hidden_states": x})
    return fn


@dataclass
class BaseRun:
    """The base forward: its output, ``logits`` as the metric reads them, the activations
    cached at ``sites``, and the suffix replay (None, with ``reason``, where none could be
    established)."""

    output: Any
    logits: Any
    acts: dict[Site, Tensor]
    suffix: Suffix | None = None
    reason: str | None = None


def keep_read(model: nn.Module, inputs: Any, readout: Sequence[int] | None) -> tuple[Any, bool]:
    """``inputs`` asking for the logits at the read positions only where the model takes
    ``logits_to_keep`` (the unembedding of a large vocabulary at every position is most of a
    small model's forward): (inputs, whether the model's logits are then exactly those read)."""
    if readout is None or not keeps_logits(model):
        return inputs, False
    named = as_dict(model, inputs)
    t = None if named is None else seq_len(named)
    if t is None:
        return inputs, False
    return {**named, "logits_to_keep": torch.tensor(read_positions(inputs, t, readout), dtype=torch.long)}, True


def metric_view(output: Any, readout: Sequence[int] | None, done: bool = False) -> Any:
    """A model output as the metric sees it: the logits at the readout positions (``done``:
    the model returned only those already)."""
    logits = logits_of(output)
    return logits if done or readout is None else logits[:, list(readout)]


def plain_base(model: nn.Module, base: Any, sites: Sequence[Site], readout: Sequence[int] | None) -> BaseRun:
    """The base forward without a suffix replay (its logits at the read positions only where it can)."""
    inputs, done = keep_read(model, base, readout)
    out, acts = run(model, inputs, cache=sites)
    return BaseRun(out, metric_view(out, readout, done), acts)


def read_positions(inputs: Any, t: int, readout: Sequence[int] | None) -> list[int]:
    """Absolute positions the metric reads: ``readout`` (indices into what the model returns,
    i.e. into the kept positions when ``inputs`` carry ``logits_to_keep``), else every kept one."""
    kept = kept_positions(inputs, t) or list(range(t))
    if readout is None:
        return kept
    return [kept[r] for r in readout]


def seq_len(inputs: Mapping[str, Any]) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        if isinstance(inputs.get(name), Tensor) and inputs[name].dim() >= 2:
            return int(inputs[name].shape[1])
    return None


@torch.no_grad()
def plan_suffix(model: nn.Module, base: Any, sites: Sequence[Site], anchors: Sequence[tuple[int, Site]],
                readout: Sequence[int] | None = None) -> BaseRun:
    """One base forward that caches ``sites`` and keeps what suffix replays need, checked by
    replaying each of ``anchors`` (a start block and a site feeding it: the shallowest and the
    deepest in use) unmodified on the first example from the middle position against the
    model's own logits.

    The result's ``suffix`` is None where no replay could be established, with the reason
    (the base forward is still done, so the caller loses nothing by asking)."""
    why, kind, inputs, s = _kind(model, base)
    if kind is None:
        based = plain_base(model, base, sites, readout)
        based.reason = why
        return based
    t = seq_len(inputs)
    read = read_positions(base, t, readout)
    if kind == "forward_from":
        kv_sites = [Site(f"{p}.attn.{n}") for p in (b.path for b in s.blocks) for n in ("k", "v")]
        out, acts = run(model, base, cache=list(dict.fromkeys([*sites, *kv_sites])), check_finite=False)
        kv = [(acts[kv_sites[2 * j]], acts[kv_sites[2 * j + 1]]) for j in range(len(s.blocks))]
        finals = tuple(model.get_submodule(p) for p in (s.final_norm, s.unembed) if p)
        logits = output_logits(out)[:, read]
        state = Suffix(model, kind, tuple(b.path for b in s.blocks), tuple(read), logits, kv, inputs, t, finals)
    else:
        cache_type = sys.modules["transformers.cache_utils"].DynamicCache
        past = cache_type()  # no config: every layer keeps every position (sliding windows are the mask's job)
        call = {**inputs, kind: past, "use_cache": True}
        if keeps_logits(model):  # the base run unembeds only the positions read
            call["logits_to_keep"] = torch.tensor(read, dtype=torch.long)
        out, acts = run(model, call, cache=sites, check_finite=False)
        logits = output_logits(out)
        logits = logits if keeps_logits(model) else logits[:, read]
        kv = [(layer.keys, layer.values) for layer in past.layers]
        short = [j for j, (k, _) in enumerate(kv) if k.dim() != 4 or k.shape[-2] != t]
        if len(kv) != len(s.blocks) or short:
            return BaseRun(out, logits, acts, None, f"the base run's KV cache has {len(kv)} layers for {len(s.blocks)} "
                           f"blocks{f', layers {short} do not hold all {t} positions' if short else ''}")
        inputs = {n: v for n, v in inputs.items() if n != "logits_to_keep"}
        state = Suffix(model, "kv cache", tuple(b.path for b in s.blocks), tuple(read), logits, kv, inputs, t,
                       kv_arg=kind, cache_type=cache_type, after_blocks=s.final_norm or s.unembed,
                       pointwise=_pointwise(s))
    for anchor in anchors:
        reason = _verify(state, anchor, acts)
        if reason is not None:
            return BaseRun(out, logits, acts, None, reason)
    return BaseRun(out, logits, acts, state)


def _kind(model: nn.Module, base: Any) -> tuple[str | None, str | None, dict[str, Any] | None, Any]:
    """(why not, kind: "forward_from" or the KV cache argument's name, the input as a dict, structure)."""
    inputs = as_dict(model, base)
    if inputs is None:
        return f"the input is a {type(base).__name__}, not a tensor or a dict of tensors", None, None, None
    if seq_len(inputs) is None:
        return "the input has no input_ids or inputs_embeds [batch, pos, ...]", None, None, None
    try:
        s = structure(model)
    except Exception as e:  # noqa: BLE001 - the caller takes the other paths and records why
        return f"no structure found: {type(e).__name__}: {e}", None, None, None
    if not s.n_layers:
        return "no block list found (structure(model, blocks=...) names it)", None, None, None
    if has_forward_from(model, s):
        if s.unembed is None:
            return "no unembedding found (structure(model, unembed=...) names it)", None, None, None
        extra = set(inputs) - _ZOO_INPUTS
        return (f"inputs {sorted(extra)} are not ones the replay knows", None, None, None) if extra else \
            (None, "forward_from", inputs, s)
    arg = kv_argument(model)
    if arg is None:
        return (f"{type(model).__name__} neither has blocks with forward_from nor takes a Hugging Face KV cache",
                None, None, None)
    extra = set(inputs) - _HF_INPUTS - {"use_cache"}
    if extra:
        return f"inputs {sorted(extra)} are not ones the replay knows", None, None, None
    return None, arg, {n: v for n, v in inputs.items() if n != "use_cache"}, s


def _verify(state: Suffix, anchor: tuple[int, Site], acts: Mapping[Site, Tensor]) -> str | None:
    block, site = anchor
    s = min(state.t // 2, max(state.read))  # at least one read position is replayed
    one = state.rows(torch.arange(1))
    try:
        with torch.no_grad():
            got = one.logits_from([(block, acts[site][:1, s:])], s)
    except Exception as e:  # noqa: BLE001 - any failure means the replay is not this model's forward
        return f"the {state.kind} replay from {site.describe()} failed: {type(e).__name__}: {e}"
    if got.shape != one.logits.shape:
        return f"the {state.kind} replay gave logits {list(got.shape)}, the model {list(one.logits.shape)}"
    err, scale = error_scale(got, one.logits)
    if err > 1e-4 * scale:
        return (f"the {state.kind} replay from {site.describe()} differs from the model's own logits by "
                      f"{err:.3g} (a hook or a forward that does more than its blocks)")
    return None
