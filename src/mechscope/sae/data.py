"""Training data for dictionaries: an activation store, or a live model; several at once.

- :func:`store_batches`: shuffled minibatches of one or more sites of a written
  :class:`~mechscope.core.store.Store`, epoch after epoch (a new shuffle each).
- :func:`live_activations`: runs the model on input batches with
  :func:`mechscope.core.run.cache`, which stops the forward after the deepest site asked
  for, so every site comes from one forward and nothing past them is computed; rows are
  mixed in a buffer (fill, shuffle, serve half, keep half: SAELens' mixing buffer) so a
  minibatch is not one sequence's tokens.
- :func:`train_many`: several dictionaries (a sweep, or one per site, or transcoders
  reading one site and predicting another) trained step by step on one stream: one
  forward, or one store read, per step for all of them.

A stream yields ``{Site: rows [batch, d]}`` with rows of all sites aligned (row i of each
from the same token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.collect import site_rows
from mechscope.core.distributed import Comm
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.core.store import Store
from mechscope.sae.arch import SAEConfig, SAEError
from mechscope.sae.train import TrainConfig, Trainer, TrainResult


def store_batches(store: Store, sites: Site | str | Sequence[Site | str] | None = None, batch_size: int = 4096,
                  *, seed: int = 0, epochs: int | None = None) -> Iterator[Tensor | dict[Site, Tensor]]:
    """Minibatches of a store, reshuffled every epoch (endless unless ``epochs``).

    One site (a Site or a key) gives tensors ``[batch_size, d]``, ready for
    :func:`~mechscope.sae.train.train`; a list of sites gives ``{Site: [batch_size, d]}``
    with aligned rows, for :func:`train_many`. ``None`` means every site of the store.
    """
    chosen: Any = list(store.sites) if sites is None else sites
    epoch = 0
    while epochs is None or epoch < epochs:
        yielded = False
        for batch in store.batches(chosen, batch_size, seed=seed + epoch, drop_last=True):
            yielded = True
            yield batch
        if not yielded:
            raise SAEError(f"the store at {store.out_dir} holds {store.n_rows} rows, fewer than one batch of "
                           f"{batch_size}; write more activations or use a smaller batch_size")
        epoch += 1


def live_activations(model: nn.Module, inputs: Iterable[Any], sites: Sequence[Site], batch_size: int = 4096,
                     *, buffer_rows: int = 65536, seed: int = 0, drop_padding: bool = True,
                     row_mask: Callable[[Any], Tensor] | None = None) -> Iterator[dict[Site, Tensor]]:
    """Minibatches ``{Site: [batch_size, d]}`` of a live model's activations at ``sites``.

    ``inputs`` yields model inputs (token tensors, or ``collate`` dicts whose padding is
    dropped). ``row_mask(inputs)`` (``[batch, pos]`` bool), when given, says which positions
    give rows instead of the padding mask (e.g. :func:`mechscope.core.text.analysis_mask`,
    which also leaves out BOS). Rows collect in a buffer of about ``buffer_rows``; when full it is shuffled,
    half is served in minibatches and half kept to mix with the next inputs. When the
    inputs end, the rest is served (a last partial batch is dropped).
    """
    sites = list(sites)
    if not sites:
        raise SAEError("live_activations needs at least one site")
    gen = torch.Generator().manual_seed(seed)
    buf: dict[Site, list[Tensor]] = {s: [] for s in sites}
    held = 0

    def serve(keep: int) -> Iterator[dict[Site, Tensor]]:
        nonlocal held
        cat = {s: torch.cat(buf[s]) for s in sites}  # [held, d]
        perm = torch.randperm(held, generator=gen)
        n_serve = (held - keep) // batch_size * batch_size
        for start in range(0, n_serve, batch_size):
            idx = perm[start:start + batch_size]
            yield {s: cat[s][idx] for s in sites}
        rest = perm[n_serve:]
        for s in sites:
            buf[s] = [cat[s][rest]]
        held = rest.numel()

    for batch_inputs in inputs:
        with torch.no_grad():  # (not around the yields: grad mode is the caller's there)
            acts = cache(model, batch_inputs, sites)  # stops after the deepest site
        kept = batch_inputs if row_mask is None else {"attention_mask": row_mask(batch_inputs)}
        rows = site_rows(acts, kept, sites, drop_padding or row_mask is not None)
        counts = {s: r.shape[0] for s, r in rows.items()}
        if len(set(counts.values())) > 1:
            raise SAEError(f"sites give different numbers of rows per input batch {counts}; train sites "
                           "that select different positions from separate streams")
        for s in sites:
            buf[s].append(rows[s].float())
        held += next(iter(counts.values()))
        if held >= buffer_rows:
            yield from serve(keep=held // 2)
    if held >= batch_size:
        yield from serve(keep=0)


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary of a :func:`train_many` run: its config and the sites it reads and predicts."""

    sae: SAEConfig
    site: Site
    target: Site | None = None  # transcoders: the site predicted (default: the input site)


def train_many(specs: Mapping[str, DictionarySpec], cfg: TrainConfig, stream: Iterable[Mapping[Site, Tensor]],
               *, comm: Comm | None = None) -> dict[str, TrainResult]:
    """Train every dictionary of ``specs`` for ``cfg.steps`` steps on one shared stream.

    Each step draws one minibatch (one forward of the model, or one store read) and
    steps every trainer on its sites' rows. Checkpointing options of ``cfg`` are not used
    here; train dictionaries one at a time with :func:`~mechscope.sae.train.train` to resume.
    """
    if not specs:
        raise SAEError("train_many needs at least one DictionarySpec")
    trainers = {name: Trainer(spec.sae, cfg, comm=comm) for name, spec in specs.items()}
    it = iter(stream)
    for step in range(cfg.steps):
        try:
            batch = next(it)
        except StopIteration:
            raise SAEError(f"the activation stream ran out after {step} of {cfg.steps} steps; "
                           "give more inputs or fewer steps") from None
        for name, spec in specs.items():
            missing = [str(s) for s in (spec.site, spec.target) if s is not None and s not in batch]
            if missing:
                raise SAEError(f"dictionary {name!r} reads {missing}, which the stream does not provide "
                               f"(it has {[str(s) for s in batch]})")
            x = batch[spec.site]
            y = batch[spec.target] if spec.target is not None and spec.sae.kind != "sae" else None
            out = trainers[name].step(x, y)
            t = trainers[name]
            if t.step_count % cfg.log_every == 0 or t.step_count == cfg.steps:
                y_n = x * t.in_scale if y is None else y * t.out_scale
                t.history.append(t.metrics(out, y_n))
    return {name: TrainResult(t.export(), t, t.history) for name, t in trainers.items()}
