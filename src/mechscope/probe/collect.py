"""Activations at one site of a model, one row per example, ready for a probe.

A thin wrapper on :func:`mechscope.core.run.cache`: it runs the inputs in chunks
(each forward stops after the site), and flattens the site's view ``[batch, n, d]`` to
rows. Use a site with one position per example (``positions="last"`` or an index
tensor) to get ``[n_examples, d]``; with several positions every (example, position)
becomes a row, in example-major order.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from mechscope.core.run import cache
from mechscope.core.site import Site


def _rows(view: Tensor) -> Tensor:  # [batch, (n,) d] -> [rows, d]
    return view.reshape(-1, view.shape[-1])


def activations(model: nn.Module, inputs: Any, site: Site, batch_size: int = 256) -> Tensor:
    """Rows ``[n_rows, d]`` of ``site``'s view on ``inputs``.

    ``inputs`` is a token tensor ``[batch, pos]``, a feature tensor, a dict batch (with
    ``attention_mask``), or an iterable of any of these (run one by one).
    """
    if isinstance(inputs, (Tensor, dict)):
        chunks = _chunks(inputs, batch_size)
        sites = _chunk_sites(site, batch_size)
    else:
        chunks, sites = iter(inputs), None
    out = []
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            s = site if sites is None else sites(i)
            out.append(_rows(cache(model, chunk, [s])[s]))
    if not out:
        raise ValueError("activations() got no inputs; pass a non-empty batch")
    return torch.cat(out)


def _chunk_sites(site: Site, size: int) -> Any:
    """Chunk ``i``'s site: a ``[batch, n]`` positions tensor has one row per example, so each
    chunk of examples takes its own rows of it; any other site is the same for every chunk."""
    pos = site.positions
    if not (isinstance(pos, tuple) and pos and pos[0] == "index"):
        return lambda i: site
    rows = torch.tensor(pos[1])  # [batch, n]
    return lambda i: site.replace(positions=rows[i * size:(i + 1) * size])


def _chunks(inputs: Tensor | dict, size: int) -> Iterable[Any]:
    n = inputs.shape[0] if isinstance(inputs, Tensor) else next(iter(inputs.values())).shape[0]
    for start in range(0, n, size):
        if isinstance(inputs, Tensor):
            yield inputs[start:start + size]
        else:
            yield {k: v[start:start + size] for k, v in inputs.items()}
