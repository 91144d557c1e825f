"""Engines: the network's logits on a batch of counterfactual examples under a mixer.

A *mixer* ``(variable, base_view, source_view) -> new_view`` says how a variable's source
changes the base's activation at the variable's site (a hard feature interchange, a
soft Boundless-DAS or DBM mask, ...). An engine runs the network on examples ``idx`` of
a :class:`~mechscope.causal.counterfactual.CounterfactualData` with every variable mixed
in, in the alignment's order, and returns the readout's logits ``[batch, classes]``.

- :class:`FullEngine` runs the whole model for every base and source in every call,
  through the core's hooked ``run`` (the reference; works on any model).
- :class:`TailEngine` computes everything before the site once (the base's whole
  activation there, every source's view) and then runs only the modules after the site
  (:mod:`mechscope.core.replay`): the same numbers, an order of magnitude less work.

:func:`make_engine` picks the tail engine when the model allows it (``"auto"``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Mixer
from mechscope.causal.counterfactual import CounterfactualData, batch_len, take
from mechscope.causal.fold import Bases, Folded, foldable
from mechscope.core.replay import ReplayError, no_cache, output_logits, plan_tail
from mechscope.core.run import batch_info, cache, run
from mechscope.core.structure import structure
from mechscope.core.suffix import BaseRun, plan_suffix, seq_len, start_block
from mechscope.core.site import Site

Readout = Callable[[Tensor], Tensor]  # model logits -> [batch, classes]
# (variables at one site, base view, their source views) -> new view: all of a site's
# variables mixed in at once (DAS fuses them into one projection; same result as a Mixer
# applied variable by variable, less work)
SiteMixer = Callable[[Sequence[str], Tensor, Sequence[Tensor]], Tensor]
log = logging.getLogger("mechscope.causal")


def identity_readout(logits: Tensor) -> Tensor:
    return logits


def last_position(logits: Tensor) -> Tensor:
    """A language model's logits at the last position ``[batch, vocab]`` (unpadded inputs)."""
    return logits[:, -1, :]


def _chunks(n: int, size: int) -> list[Tensor]:
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def mixed_in(anchor: Tensor, index: Mapping[Site, Tensor | None], sources: Mapping[str, Tensor],
             places: Mapping[str, Site], idx: Tensor, mixer: Mixer, site_mixer: SiteMixer | None) -> Tensor:
    """Rows ``idx`` of the precomputed ``anchor`` activation with every variable's source view
    mixed in at its site (``index``: each site's resolved positions per example, or None)."""
    act = anchor.index_select(0, idx)  # index_select: ~4x faster than anchor[idx] on CPU
    groups = ([([v], site) for v, site in places.items()] if site_mixer is None else
              [(names, site) for site, names in group_by_site(places).items()])
    for names, site in groups:
        where = index[site]
        where = None if where is None else where.index_select(0, idx)
        view = site.select(act, where)
        views = [sources[v].index_select(0, idx) for v in names]
        new = mixer(names[0], view, views[0]) if site_mixer is None else site_mixer(names, view, views)
        act = site.scatter(act, where, new)
    return act


class _Mix:
    """A mixer bound to one variable and its source views, as a core intervention."""

    def __init__(self, mixer: Mixer, variable: str, source: Tensor) -> None:
        self.mixer, self.variable, self.source = mixer, variable, source

    def __call__(self, view: Tensor, call: Any) -> Tensor:
        return self.mixer(self.variable, view, self.source)


class _MixSite:
    """A site mixer bound to a site's variables and their source views, as a core intervention."""

    def __init__(self, mixer: SiteMixer, variables: list[str], sources: list[Tensor]) -> None:
        self.mixer, self.variables, self.sources = mixer, variables, sources

    def __call__(self, view: Tensor, call: Any) -> Tensor:
        return self.mixer(self.variables, view, self.sources)


def group_by_site(places: Mapping[str, Site]) -> dict[Site, list[str]]:
    """Variables grouped by their site, in the alignment's order."""
    groups: dict[Site, list[str]] = {}
    for v, s in places.items():
        groups.setdefault(s, []).append(v)
    return groups


class FullEngine:
    """Whole-model forwards through hooks, for every base and source, in every call.

    ``full_sources=True`` runs each source through the whole network (as a naive
    implementation does); ``False`` stops each source's forward at its site.
    """

    kind = "full"

    def __init__(self, model: nn.Module, data: CounterfactualData, places: Mapping[str, Site],
                 readout: Readout = identity_readout, full_sources: bool = False) -> None:
        self.model, self.data, self.places, self.readout = model, data, dict(places), readout
        self.full_sources = full_sources
        self.n = len(data)

    def source_views(self, variable: str, idx: Tensor) -> Tensor:
        site = self.places[variable]
        with torch.no_grad():
            _, acts = run(self.model, take(self.data.sources[variable], idx), cache=[site],
                          stop_when_cached=not self.full_sources)
        return acts[site]

    def base_views(self, site: Site, idx: Tensor) -> Tensor:
        with torch.no_grad():
            return cache(self.model, take(self.data.base, idx), [site])[site]

    def logits(self, idx: Tensor, mixer: Mixer, site_mixer: SiteMixer | None = None,
               bases: Bases | None = None) -> Tensor:
        """Logits of examples ``idx`` with every variable mixed in (``site_mixer``: a site's at once;
        ``bases`` is the tail engine's, unused here)."""
        if site_mixer is None:
            interventions = [(self.places[v], _Mix(mixer, v, self.source_views(v, idx))) for v in self.places]
        else:
            interventions = [(site, _MixSite(site_mixer, names, [self.source_views(v, idx) for v in names]))
                             for site, names in group_by_site(self.places).items()]
        out, _ = run(self.model, take(self.data.base, idx), interventions)
        return self.readout(output_logits(out))


class TailEngine:
    """Precomputed activations up to the site; only the modules after it run per call.

    Every variable's site must be at the same module (same path, io and element); they
    may select different positions there.
    """

    kind = "tail"

    def __init__(self, model: nn.Module, data: CounterfactualData, places: Mapping[str, Site],
                 readout: Readout = identity_readout, chunk: int = 4096) -> None:
        self.model, self.data, self.places, self.readout = model, data, dict(places), readout
        self.n = len(data)
        keys = {s.module_key for s in self.places.values()}
        if len(keys) != 1:
            raise ReplayError(f"the variables' sites are at {len(keys)} different modules {sorted(map(str, keys))}; "
                            "the tail engine needs them at one module")
        path, io, element, rows_of = keys.pop()
        if rows_of is not None:
            raise ReplayError(f"the variables' site {path!r} runs on flattened rows; the tail engine replays from a "
                            "[batch, pos, ...] activation: use engine='full' or a site on the block")
        self.anchor_site = Site(path, io, element)
        example = take(data.base, torch.arange(min(4, self.n)))
        self.plan = plan_tail(model, self.anchor_site, example)
        self.state = self.plan.precompute(data.base)
        anchor = self.state.anchor  # [n, ...]
        info = batch_info(data.base)
        self.index = {s: s.resolve_positions(anchor, info) for s in set(self.places.values())}
        self.sources = {v: self._source_views(v, chunk) for v in self.places}
        self._fold: Folded | None | bool = False  # False: not tried yet; None: not foldable

    def _source_views(self, variable: str, chunk: int) -> Tensor:
        site, inputs = self.places[variable], self.data.sources[variable]
        with torch.no_grad():
            parts = [cache(self.model, no_cache(self.model, take(inputs, i)), [site])[site]
                     for i in _chunks(batch_len(inputs), chunk)]
        return torch.cat(parts)

    def source_views(self, variable: str, idx: Tensor) -> Tensor:
        return self.sources[variable].index_select(0, idx)

    def base_views(self, site: Site, idx: Tensor) -> Tensor:
        index = self.index[site] if site in self.index else site.resolve_positions(self.state.anchor, batch_info(self.data.base))
        return site.select(self.state.anchor.index_select(0, idx), None if index is None else index[idx])

    @property
    def base_logits(self) -> Tensor:
        """The model's own readout on every base, from the precompute run."""
        return self.readout(self.state.logits)

    def logits(self, idx: Tensor, mixer: Mixer, site_mixer: SiteMixer | None = None,
               bases: Bases | None = None) -> Tensor:
        """Logits of examples ``idx`` with every variable mixed in (``site_mixer``: a site's at once).

        ``bases``: where the mix is a hard interchange along orthonormal columns (DAS), each
        variable's columns; on a ``[n, d]`` site with a chain after it the interchange is then
        folded into the layer after the site (:mod:`mechscope.causal.fold`, checked once)."""
        folded = self._folded(bases)
        b = None if folded is None else bases(folded.variables)
        if b is not None:
            if not folded.checked:
                why = folded.agrees(idx, b, lambda few: self._mixed(few, mixer, site_mixer), self.readout)
                folded.checked = True
                if why is not None:
                    log.warning("DAS keeps the general tail path: %s", why)
                    self._fold = None
                    return self._mixed(idx, mixer, site_mixer)
            return self.readout(folded.logits(idx, b))
        return self._mixed(idx, mixer, site_mixer)

    def _mixed(self, idx: Tensor, mixer: Mixer, site_mixer: SiteMixer | None) -> Tensor:
        act = mixed_in(self.state.anchor, self.index, self.sources, self.places, idx, mixer, site_mixer)
        return self.readout(self.state.replay(act, idx))

    def _folded(self, bases: Bases | None) -> Folded | None:
        """The folded interchange, built on first use (None where it does not apply)."""
        if bases is None or self._fold is None:
            return None
        if self._fold is False:  # not tried yet
            groups = group_by_site(self.places)
            site, names = next(iter(groups.items()))
            why = "the variables are at several sites" if len(groups) > 1 else foldable(
                self.state, site, self.index[site], len(names))
            if why is not None:
                log.debug("the interchange is not folded: %s", why)
                self._fold = None
            elif bases(names) is None:  # this alignment's mix is not a hard interchange: ask again next time
                return None
            else:
                self._fold = Folded(self.state, names, self.sources)
        return self._fold


class SuffixEngine:
    """The base run once, with its keys and values; per call only positions ``>= p`` of the
    blocks after the site run (:mod:`mechscope.core.suffix`), ``p`` the first position any
    variable intervenes on. For a causal language model intervened at its last position this
    is one position of the later blocks instead of the whole sequence.

    Every variable's site must be a whole block input or output at one block, at fixed
    positions (the same for every example).
    """

    kind = "suffix"

    def __init__(self, model: nn.Module, data: CounterfactualData, places: Mapping[str, Site],
                 readout: Readout = identity_readout, *, base: BaseRun | None = None,
                 sources: Mapping[str, Tensor] | None = None) -> None:
        """``base``: a :func:`~mechscope.core.suffix.plan_suffix` run of ``data.base`` that
        cached the variables' block (one run serves engines at many blocks); ``sources``:
        each variable's source views at its site ``[n, ...]`` (computed here when absent)."""
        self.model, self.data, self.places, self.readout = model, data, dict(places), readout
        self.n = len(data)
        keys = {s.module_key for s in self.places.values()}
        if len(keys) != 1:
            raise ReplayError(f"the variables' sites are at {len(keys)} different modules; the suffix engine needs one")
        path, io, element, _ = keys.pop()
        anchor = Site(path, io, element)
        self.block = start_block(structure(model), anchor)
        if self.block is None:
            raise ReplayError(f"{anchor.describe()} is not a block's input or output: the suffix engine replays blocks")
        if base is None:
            t = seq_len(data.base) if isinstance(data.base, Mapping) else int(data.base.shape[1])
            base = plan_suffix(model, data.base, [anchor], [(self.block, anchor)], readout=[t - 1])
        if base.suffix is None:
            raise ReplayError(f"no suffix replay on this model: {base.reason}")
        if anchor not in base.acts or base.suffix.batch != self.n:
            raise ReplayError(f"the base run given has no activation at {anchor.describe()} for all {self.n} "
                              f"examples: plan_suffix(model, data.base, sites=[..., {anchor.describe()}], ...)")
        self.suffix, self.anchor = base.suffix, base.acts[anchor]  # [n, pos, d]
        info = batch_info(data.base)
        self.index = {s: s.resolve_positions(self.anchor, info) for s in set(self.places.values())}
        starts = [int(i.min()) for i in self.index.values() if i is not None]
        if len(starts) != len(self.index) or any(bool((i != i[:1]).any()) for i in self.index.values()):
            raise ReplayError("the suffix engine needs every variable's site at fixed positions (positions=(p, ...))")
        self.start = min(starts)
        self.sources = dict(sources) if sources is not None else {
            v: torch.cat([cache(model, no_cache(model, take(data.sources[v], i)), [site])[site]
                          for i in _chunks(self.n, 256)]) for v, site in self.places.items()}

    def source_views(self, variable: str, idx: Tensor) -> Tensor:
        return self.sources[variable].index_select(0, idx)

    def base_views(self, site: Site, idx: Tensor) -> Tensor:
        return site.select(self.anchor.index_select(0, idx), self.index[site].index_select(0, idx))

    def logits(self, idx: Tensor, mixer: Mixer, site_mixer: SiteMixer | None = None,
               bases: Bases | None = None) -> Tensor:
        """Logits of examples ``idx`` with every variable mixed in (``site_mixer``: a site's at once;
        ``bases`` is the tail engine's, unused here)."""
        act = mixed_in(self.anchor, self.index, self.sources, self.places, idx, mixer, site_mixer)
        return self.readout(self.suffix.rows(idx).logits_from([(self.block, act[:, self.start:])], self.start))


Engine = FullEngine | TailEngine | SuffixEngine


def make_engine(model: nn.Module, data: CounterfactualData, places: Mapping[str, Site],
                readout: Readout = identity_readout, kind: str = "auto") -> Engine:
    """``"tail"`` or ``"suffix"`` (error if impossible), ``"full"``, or ``"auto"`` (tail, else
    full, logged)."""
    if kind not in ("auto", "tail", "full", "suffix"):
        raise ValueError(f"engine must be 'auto', 'tail', 'suffix' or 'full', got {kind!r}")
    if kind == "full":
        return FullEngine(model, data, places, readout)
    if kind == "suffix":
        return SuffixEngine(model, data, places, readout)
    try:
        return TailEngine(model, data, places, readout)
    except ReplayError as e:
        if kind == "tail":
            raise
        log.info("running full forwards for every step: %s", e)
        return FullEngine(model, data, places, readout)
