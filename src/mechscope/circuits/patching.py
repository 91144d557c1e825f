"""Activation patching over many cells, batched: several cells per forward.

A *cell* is a component at a position: a :class:`~mechscope.core.site.Site` (the
residual stream before a block, an attention or MLP output, one head's output) and a
position index (``None``: every position). Patching a cell runs one input with that
cell's activation taken from the other input:

- ``direction="denoise"``: run the corrupt input, patch in the clean activation
  (is the component *sufficient* to restore the behaviour?);
- ``direction="noise"``: run the clean input, patch in the corrupt activation
  (is it *necessary*?).

Every result carries the normalised patching score
``(M_patched − M_corrupt) / (M_clean − M_corrupt)`` (1: as clean, 0: as corrupt) and the
*effect* of the patch in the direction's sense (``score`` for denoising, ``1 − score``
for noising), beside the ablation type, so no score is ever reported without the
intervention that produced it.

Speed: ``k`` cells are patched in one forward of a batch repeated ``k`` times; each
copy of the batch carries its own cell's patch (one hook per module, one indexed write).
Residual-stream and head cells replay only what their patch can change: the positions
from the patched one on, of the blocks after the site (a head's: its own block on, the
head's slice written into the output projection's input, checked once against a whole
forward), from the base run's keys and values (:mod:`mechscope.circuits.suffix` on
:mod:`mechscope.core.suffix`: the built-in transformer and Hugging Face causal LMs); with a ``readout`` only the positions the metric
reads are unembedded. Which path patched how many cells, and why a faster one was refused,
is in the result's ``extra``. Positions are absolute indices into the sequence (clean and
corrupt batches must have the same shape, as patching needs aligned positions).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from mechscope.circuits import suffix
from mechscope.core.intervene import Replace
from mechscope.core.replay import Replay, ReplayError, error_scale, plan_tail, slice_rows
from mechscope.core.run import HookCall, cache, call_model, logits_of, run
from mechscope.core.site import Site, SiteError
from mechscope.core.structure import structure
from mechscope.core.suffix import BaseRun, keep_read, plain_base, plan_suffix

Direction = Literal["denoise", "noise"]
Metric = Callable[[Any], Tensor]  # model output for one batch -> scalar


@dataclass(frozen=True)
class Cell:
    """A component (``site``, without positions) at ``position`` (None: all positions)."""

    site: Site
    position: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.site.positions is not None:
            raise SiteError(f"a cell's site must not select positions (got {self.site.describe()}); "
                            "give the position as Cell(site, position=...)")

    def __str__(self) -> str:
        return self.label or f"{self.site}@{'all' if self.position is None else self.position}"


@dataclass
class PatchResult:
    """Scores per cell, in the order of ``cells``; ``ablation`` says what was patched with what."""

    cells: list[Cell]
    values: Tensor  # [n_cells] metric after the patch
    clean: float
    corrupt: float
    direction: str
    ablation: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> Tensor:  # [n_cells] (M_patched − M_corrupt) / (M_clean − M_corrupt)
        return normalised_score(self.values, self.clean, self.corrupt)

    @property
    def effects(self) -> Tensor:  # [n_cells]: how much the patch moved the metric, as a share of clean − corrupt
        return self.scores if self.direction == "denoise" else 1 - self.scores

    def to_dict(self) -> dict[str, Any]:
        return {"cells": [str(c) for c in self.cells], "values": self.values.tolist(),
                "scores": self.scores.tolist(), "clean": self.clean, "corrupt": self.corrupt,
                "direction": self.direction, "ablation": self.ablation, **self.extra}


def normalised_score(patched: Tensor, clean: float, corrupt: float) -> Tensor:
    """``(M_patched − M_corrupt) / (M_clean − M_corrupt)``; an error when clean == corrupt."""
    gap = clean - corrupt
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        raise ValueError(f"the metric is the same on the clean ({clean:.6g}) and corrupt ({corrupt:.6g}) inputs, "
                         "so no patch can be scored against it; choose inputs (or a metric) that differ")
    return (patched - corrupt) / gap


def ablation_name(direction: Direction) -> str:
    return "patch clean->corrupt (denoising)" if direction == "denoise" else "patch corrupt->clean (noising)"


# ------------------------------------------------------------------------------ batching


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, dict):
        return next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0]
    raise TypeError(f"patching needs inputs as a tensor or a dict of tensors with a batch dim, got {type(inputs).__name__}")


def repeat_batch(inputs: Any, k: int) -> Any:
    """The batch repeated ``k`` times along dim 0 (copy j is rows j*B .. (j+1)*B - 1)."""
    if isinstance(inputs, Tensor):
        return inputs.repeat(k, *([1] * (inputs.dim() - 1)))
    # logits_to_keep names positions, not rows: it is the same for every copy
    return {n: v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and n != "logits_to_keep" else v
            for n, v in inputs.items()}


def _check_pair(clean: Any, corrupt: Any) -> None:
    def shapes(x: Any) -> Any:
        return tuple(x.shape) if isinstance(x, Tensor) else {n: tuple(v.shape) for n, v in x.items() if isinstance(v, Tensor)}
    if shapes(clean) != shapes(corrupt):
        raise ValueError(f"clean and corrupt inputs must have the same shapes (positions are patched one to one), "
                         f"got {shapes(clean)} and {shapes(corrupt)}; pad them to the same length")


def base_and_source(clean: Any, corrupt: Any, direction: Direction, cells: Sequence[Cell] | None = None,
                    caller: str = "patching") -> tuple[Any, Any, list[Site]]:
    """Checked inputs: (base run, source run, the cells' distinct sites in order).

    ``"noise"`` runs the clean input with corrupt values patched in; ``"denoise"`` the reverse.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if cells is not None and not cells:
        raise ValueError(f"{caller} needs at least one cell")
    _check_pair(clean, corrupt)
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    return base, source, list(dict.fromkeys(c.site for c in cells or ()))


class _CellWrites:
    """The intervention at one site: copy j of the repeated batch gets its cell's source values."""

    def __init__(self, source: Tensor, copies: list[int], positions: list[int | None], k: int) -> None:
        self.source, self.k = source, k  # source: [batch, pos, ...] view of the other run
        self.whole = torch.tensor([j for j, p in zip(copies, positions) if p is None], dtype=torch.long)
        pairs = [(j, p) for j, p in zip(copies, positions) if p is not None]
        self.copy_idx = torch.tensor([j for j, _ in pairs], dtype=torch.long)
        self.pos_idx = torch.tensor([p for _, p in pairs], dtype=torch.long)

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        b = self.source.shape[0]
        if view.shape[0] != self.k * b or view.shape[1:] != self.source.shape[1:]:
            raise SiteError(f"at {call.site}: the patched run's activation {list(view.shape)} does not match "
                            f"{self.k} copies of the source's {list(self.source.shape)}")
        out = view.clone().view(self.k, b, *view.shape[1:])  # [k, batch, pos, ...]
        src = self.source.to(view.dtype)
        if self.whole.numel():
            out[self.whole] = src
        if self.copy_idx.numel():
            out[self.copy_idx, :, self.pos_idx] = src[:, self.pos_idx].movedim(1, 0)  # [n, batch, ...]
        return out.view_as(view)


def by_site(cells: Sequence[Cell]) -> dict[Site, list[int]]:
    """Indices of the cells at each site, in order (one hash per cell, no pairwise compares)."""
    out: dict[Site, list[int]] = {}
    for i, c in enumerate(cells):
        out.setdefault(c.site, []).append(i)
    return out


def check_positions(cells: Sequence[Cell], acts: dict[Site, Tensor]) -> None:
    """An error naming the cell whose position lies outside its site's activation ``acts[site]``."""
    for site, idx in by_site(cells).items():
        a = acts[site]
        for i in idx:
            c = cells[i]
            if c.position is not None and (a.dim() < 3 or not -a.shape[1] <= c.position < a.shape[1]):
                raise SiteError(f"cell {c}: position {c.position} is outside the activation {list(a.shape)} "
                                f"(positions index dim 1 of [batch, pos, ...])")


def _metric(metric: Metric, out: Any) -> float:
    value = metric(logits_of(out))
    value = value.detach() if isinstance(value, Tensor) else torch.tensor(value)
    if value.numel() != 1:
        raise ValueError(f"the metric must return a scalar (mean over the batch), got shape {list(value.shape)}")
    return float(value)


def patch_cells(model: nn.Module, clean: Any, corrupt: Any, cells: Sequence[Cell], metric: Metric,
                direction: Direction = "denoise", cells_per_forward: int | None = None,
                max_rows: int = 512, replay_tail: bool = True, readout: Sequence[int] | None = None) -> PatchResult:
    """Patch every cell (one at a time) and score it.

    ``cells_per_forward`` cells share a forward (default: as many as fit in ``max_rows``
    sequences). With ``replay_tail``, a cell on a block's input or output (the residual
    stream) or on heads of a block's output projection at position p runs only positions
    >= p of the blocks from there on, from the base run's keys and values
    (:mod:`mechscope.core.suffix`: the built-in transformer and Hugging Face causal LMs); a residual cell without a position runs the blocks after it
    (:mod:`mechscope.core.replay`); other cells run whole forwards of a repeated batch. Each
    replay is checked against the model's own logits first and, where it cannot be
    established, the next path runs: the numbers are the same. The result's
    ``extra["paths"]`` counts the cells each path patched and ``extra["fallback"]`` gives
    the reasons a replay was refused (residual cells that fell back also warn).
    ``readout``: the positions whose logits the metric reads (it then gets ``[batch,
    len(readout), vocab]``); replays (and models taking ``logits_to_keep``) apply the final
    norm and unembedding there only.
    """
    base, source, sites = base_and_source(clean, corrupt, direction, cells, "patch_cells")
    values = torch.empty(len(cells), dtype=torch.float64)
    paths, notes = {"suffix": 0, "tail": 0, "forwards": 0}, {}
    with torch.no_grad():
        src_in, src_done = keep_read(model, source, readout)
        out_source, src = run(model, src_in, cache=sites)  # the source's metric and activations
        check_positions(cells, src)
        fast = _suffix_sites(model, cells, notes) if replay_tail else {}
        based = _base_run(model, base, sites, fast, readout)
        if based.reason is not None:
            notes["suffix"] = based.reason
        m_base = _metric(metric, based.logits)
        m_source = _metric(metric, logits_of(out_source) if src_done else _read(out_source, readout))
        m_clean, m_corrupt = (m_source, m_base) if direction == "denoise" else (m_base, m_source)
        normalised_score(torch.zeros(1), m_clean, m_corrupt)  # refuse inputs no patch can be scored on
        b = batch_size_of(base)
        k_max = cells_per_forward or max(1, max_rows // b)
        score = lambda i, logits: values.__setitem__(i, _metric(metric, logits))  # noqa: E731
        if based.suffix is not None:
            _heads_replay_or_not(model, base, based, cells, fast, src, readout, notes)
        mine = [(i, fast[c.site][0], c.position) for i, c in enumerate(cells) if based.suffix is not None
                and c.site in fast and c.position is not None]
        if mine:
            heads = {i: cells[i].site for i, _, _ in mine if fast[cells[i].site][1] != cells[i].site}
            suffix.patch(based.suffix, mine, {i: based.acts[fast[cells[i].site][1]] for i, _, _ in mine},
                         {i: src[cells[i].site] for i, _, _ in mine}, score, k_max, heads)
        done = {i for i, _, _ in mine}
        rest = [i for i in range(len(cells)) if i not in done]
        tails = _tails(model, base, list(dict.fromkeys(cells[i].site for i in rest)), notes) \
            if replay_tail and rest else {}
        by_forward = [i for i in rest if tails.get(cells[i].site) is None]
        _patch_by_forwards(model, base, src, cells, by_forward, score, k_max, b, readout)
        left = set(rest)
        for site, tail in tails.items():
            _patch_by_tail(tail, site, src[site], [c if i in left else None for i, c in enumerate(cells)],
                           metric, values, k_max, b, readout)
    paths.update(suffix=len(mine), tail=len(rest) - len(by_forward), forwards=len(by_forward))
    _say_fallbacks(cells, fast, rest, notes)
    extra = {"paths": paths, **({"fallback": notes} if notes else {})}
    return PatchResult(list(cells), values, m_clean, m_corrupt, direction, ablation_name(direction), extra)


def _say_fallbacks(cells: Sequence[Cell], fast: dict[Site, tuple[int, Site]], rest: Sequence[int],
                   notes: dict[str, str]) -> None:
    """A warning when residual or head cells with a position could not take the suffix replay."""
    missed = [i for i in rest if cells[i].site in fast and cells[i].position is not None]
    if missed and notes:
        warnings.warn(f"patch_cells: {len(missed)} residual-stream or head cell(s) did not use the suffix replay "
                      f"({'; '.join(f'{k}: {v}' for k, v in notes.items())}); they ran by slower paths with the "
                      "same numbers (the result's extra['paths'] says which)", stacklevel=3)


def _base_run(model: nn.Module, base: Any, sites: Sequence[Site], fast: dict[Site, tuple[int, Site]],
              readout: Sequence[int] | None) -> BaseRun:
    """The base run: its output, its logits as the metric reads them, the cells' base
    activations (and the residual inputs of the blocks head cells start at) and, where the
    suffix replay applies (checked), its state."""
    if not fast:
        return plain_base(model, base, sites, readout)
    starts = [block for block, _ in fast.values()]
    ends = dict.fromkeys([min(starts), max(starts)])  # the shallowest and deepest start blocks
    anchors = [(block, next(resid for b, resid in fast.values() if b == block)) for block in ends]
    return plan_suffix(model, base, list(dict.fromkeys([*sites, *(r for _, r in fast.values())])), anchors, readout)


def _heads_replay_or_not(model: nn.Module, base: Any, based: BaseRun, cells: Sequence[Cell],
                         fast: dict[Site, tuple[int, Site]], src: dict[Site, Tensor], readout: Sequence[int] | None,
                         notes: dict[str, str]) -> None:
    """Check the head writes of the suffix replay once: the first head cell's logits on the
    first example, replayed and by a whole forward, must agree. Where they do not (the
    output projection runs other than once per block on every position), head sites leave
    ``fast`` (they take whole forwards) and the reason goes to ``notes``."""
    head_sites = [site for site, (_, resid) in fast.items() if resid != site]
    first = next((c for c in cells if c.site in head_sites and c.position is not None), None)
    if first is None:
        return
    replayed, whole = {}, {}
    block, resid = fast[first.site]
    row, b = torch.arange(1), batch_size_of(base)  # the first example
    suffix.patch(based.suffix.rows(row), [(0, block, first.position)], {0: based.acts[resid][:1]},
                 {0: src[first.site][:1]}, lambda i, logits: replayed.__setitem__(i, logits), 1, {0: first.site})
    # its rows of the base input (logits_to_keep names positions, not rows)
    base1 = {n: v if n == "logits_to_keep" else slice_rows(v, row, b) for n, v in base.items()} \
        if isinstance(base, dict) else slice_rows(base, row, b)
    _patch_by_forwards(model, base1, {first.site: src[first.site][:1]}, [first], [0],
                       lambda i, logits: whole.__setitem__(i, logits), 1, 1, readout)
    err, scale = error_scale(replayed[0], logits_of(whole[0]))
    if err > 1e-4 * scale:
        for site in head_sites:
            del fast[site]
        notes["suffix heads"] = (f"a head write replayed at {first.site.describe()} differs from a whole forward by "
                                 f"{err:.3g}: head cells take whole forwards")


def _patch_by_forwards(model: nn.Module, base: Any, src: dict[Site, Tensor], cells: Sequence[Cell], todo: list[int],
                       score: Callable[[int, Any], None], k_max: int, b: int, readout: Sequence[int] | None) -> None:
    """Cells ``todo`` by whole forwards of the repeated base batch, ``k_max`` cells each."""
    if not todo:
        return
    base_in, done = keep_read(model, base, readout)  # a model taking logits_to_keep unembeds the read positions only
    for start in range(0, len(todo), k_max):
        chunk = todo[start:start + k_max]
        writes = {}
        for site in dict.fromkeys(cells[i].site for i in chunk):
            idx = [j for j, i in enumerate(chunk) if cells[i].site == site]
            writes[site] = _CellWrites(src[site], idx, [cells[chunk[j]].position for j in idx], len(chunk))
        out, _ = run(model, repeat_batch(base_in, len(chunk)), writes)
        for j, i in enumerate(chunk):
            rows = _rows(out, j, b)
            score(i, rows if done else _read(rows, readout))


def _suffix_sites(model: nn.Module, cells: Sequence[Cell], notes: dict[str, str]) -> dict[Site, tuple[int, Site]]:
    """Sites whose positioned cells the suffix replay may patch, with the block each starts
    at and the residual site entering it (:func:`mechscope.circuits.suffix.feeds`)."""
    if not any(c.position is not None for c in cells):
        return {}
    try:
        s = structure(model)
    except Exception as e:  # noqa: BLE001 - any model the probe cannot read takes the other paths, said
        notes["suffix"] = f"no structure found: {type(e).__name__}: {e}"
        return {}
    out = {}
    for c in cells:
        if c.position is not None and c.site not in out:
            fed = suffix.feeds(s, c.site)
            if fed is not None:
                out[c.site] = fed
    return out


def _tails(model: nn.Module, base: Any, sites: Sequence[Site], notes: dict[str, str]) -> dict[Site, Replay]:
    """Verified replays of the blocks after each residual-stream site, from one precompute.

    The first block site's tail (:func:`mechscope.core.replay.plan_tail`, verified against
    the model's own logits) records every later block's arguments; the tails of later
    sites reuse those records with their own base activation. Sites that are not a whole
    block input or output are left out (full forwards); a model the tail cannot replay
    leaves its reason in ``notes``.
    """
    whole = [s for s in sites if s.heads is None and s.features is None]
    params = inspect.signature(model.forward).parameters
    if isinstance(base, Tensor) and "use_cache" in params:  # a KV cache must not be recorded and replayed
        base = {next(iter(params)): base, "use_cache": False}
    first, why = None, []
    for site in whole:
        try:
            tail = plan_tail(model, site, base)
        except ReplayError as e:
            why.append(f"{site.describe()}: {e}")
            continue
        if tail.kind == "blocks":
            first = (site, tail)
            break
    if first is None:
        if why:
            notes["tail"] = why[0]
        return {}
    site0, tail0 = first
    paths = [p for p, _ in tail0.modules]
    try:
        state0 = tail0.precompute(base)
    except ReplayError as e:
        notes["tail"] = str(e)
        return {}
    later = [s for s in whole if s != site0 and s.path in paths and s.element in (None, 0)]
    acts = cache(model, base, later) if later else {}
    return {site0: state0, **{site: state0.later(site, acts[site]) for site in later}}


def _patch_by_tail(state: Replay, site: Site, source: Tensor, cells: Sequence[Cell | None], metric: Metric,
                   values: Tensor, k_max: int, b: int, readout: Sequence[int] | None) -> None:
    """Patch the cells at ``site`` by writing into the base activation and replaying the tail."""
    mine = [i for i, c in enumerate(cells) if c is not None and c.site == site]
    call = HookCall(site, None, None)
    for start in range(0, len(mine), k_max):
        chunk = mine[start:start + k_max]
        k = len(chunk)
        x = state.anchor.repeat(k, *([1] * (state.anchor.dim() - 1)))  # [k*batch, pos, d]
        x = _CellWrites(source, list(range(k)), [cells[i].position for i in chunk], k)(x, call)
        logits = state.replay(x, torch.arange(b).repeat(k), readout)  # [k*batch, n_readout, vocab]
        for j, i in enumerate(chunk):
            values[i] = _metric(metric, logits[j * b:(j + 1) * b])


def _read(out: Any, readout: Sequence[int] | None) -> Any:
    """The model's output as a metric sees it: logits, at the readout positions when given."""
    out = logits_of(out)
    return out if readout is None else out[:, list(readout)]


def _rows(out: Any, j: int, b: int) -> Any:
    """Copy ``j`` of a repeated batch's output (tensors, or a dict / tuple of them)."""
    if isinstance(out, Tensor):
        return out[j * b:(j + 1) * b]
    if hasattr(out, "logits"):  # a Hugging Face ModelOutput: the metric reads its logits
        return out.logits[j * b:(j + 1) * b]
    if isinstance(out, dict):
        return {n: _rows(v, j, b) if isinstance(v, Tensor) else v for n, v in out.items()}
    if isinstance(out, tuple):
        return tuple(_rows(v, j, b) if isinstance(v, Tensor) else v for v in out)
    raise TypeError(f"cannot split a model output of type {type(out).__name__} into copies of the batch")


def patch_one_by_one(model: nn.Module, clean: Any, corrupt: Any, cells: Sequence[Cell], metric: Metric,
                     direction: Direction = "denoise", readout: Sequence[int] | None = None) -> PatchResult:
    """The reference: one forward per cell (what per-cell patching tools do); same numbers."""
    return patch_cells(model, clean, corrupt, cells, metric, direction, cells_per_forward=1, replay_tail=False, readout=readout)


# ------------------------------------------------------------------------------ path patching


def path_patch(model: nn.Module, clean: Any, corrupt: Any, sender: Site, receiver: Site, metric: Metric,
               direction: Direction = "noise") -> float:
    """Effect of the path sender → receiver alone (exact, two runs).

    Run the base with ``sender`` patched from the source and read the ``receiver``; then
    run the base with only the receiver set to that value (every other path from the
    sender is left at the base). Returns the normalised patching score.
    """
    base, source, _ = base_and_source(clean, corrupt, direction)
    with torch.no_grad():
        m_clean, m_corrupt = _metric(metric, call_model(model, clean)), _metric(metric, call_model(model, corrupt))
        sent = cache(model, source, [sender])[sender]
        _, acts = run(model, base, {sender: Replace(sent)}, cache=[receiver])
        out, _ = run(model, base, {receiver: Replace(acts[receiver])})
    return float(normalised_score(torch.tensor(_metric(metric, out)), m_clean, m_corrupt))
