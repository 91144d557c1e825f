"""Activations at a site as rows ``[n, d]``: what probes, dictionaries and stores train on.

One implementation for every reader of activations as rows (probes, steering directions,
SAE training from a live model or a store, the activation store itself):

- :func:`flatten_rows`: a site's view ``[batch, (pos,) d]`` (``[batch, pos, n_heads,
  d_head]`` for heads) as rows, dropping padding positions by the attention mask;
- :func:`site_rows`: the rows of several sites from one :func:`~mechscope.core.run.cache`
  of an input batch (one forward for all of them, stopped after the deepest);
- :func:`activations`: one site's rows over many inputs, run in chunks.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.run import cache
from mechscope.core.site import Site, SiteError


class RowsError(ValueError):
    """Activations that are not finite ``[n, d]`` rows."""


def as_rows(x: Any, what: str = "activations") -> Tensor:
    """``x`` as a float64 ``[n, d]`` tensor; NaN/inf, empty and wrong ranks are clear errors."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.double()
    if x.dim() != 2:
        raise RowsError(f"{what} must be a 2-D tensor [n_examples, d], got shape {list(x.shape)}; "
                        "select one position per example (e.g. Site(..., positions='last')) and "
                        "flatten with x.reshape(-1, x.shape[-1])")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise RowsError(f"{what} are empty (shape {list(x.shape)}); give at least one example and one feature")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()
        raise RowsError(f"{what} hold {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf "
                        f"value(s) in {rows.numel()} row(s) (first rows: {rows[:5].tolist()}); "
                        "check the model's numerics or drop those examples")
    return x.double()


def flatten_rows(view: Tensor, site: Site, attention_mask: Tensor | None = None, drop_padding: bool = True) -> Tensor:
    """A site's view as rows ``[n, d]``, dropping padding positions by the attention mask.

    ``[batch, d]`` is already rows; ``[batch, pos, d]`` (or ``[batch, pos, n_heads, d_head]``
    with heads) becomes ``[batch * pos, d]``, or only the real tokens' rows when a mask
    is given. A site that selects positions keeps all of them: they are resolved against
    real tokens already.
    """
    feat_dims = 2 if site.heads is not None else 1
    lead = view.dim() - feat_dims
    if lead not in (1, 2):
        raise SiteError(
            f"site {site}: cannot turn an activation view of shape {list(view.shape)} into rows; "
            "expected [batch, d] or [batch, pos, d] (with heads: [batch, pos, n_heads, d_head])"
        )
    rows = view.flatten(lead) if feat_dims > 1 else view  # [batch, d] or [batch, pos, d]
    if lead == 1:
        return rows
    if drop_padding and attention_mask is not None and site.positions is None:
        if tuple(attention_mask.shape) != tuple(rows.shape[:2]):
            raise SiteError(
                f"site {site}: cannot drop padding, the activation has {list(rows.shape[:2])} "
                f"[batch, pos] but the attention mask is {list(attention_mask.shape)}; pass "
                "drop_padding=False or select positions on the site"
            )
        return rows[attention_mask.to(rows.device).bool()]  # [n_real, d]
    return rows.reshape(-1, rows.shape[-1])  # [batch * pos, d]


def attention_mask(inputs: Any) -> Tensor | None:
    """The attention mask of a dict batch, or None."""
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        return inputs["attention_mask"]
    return None


def site_rows(acts: Mapping[Site, Tensor], inputs: Any, sites: Sequence[Site],
              drop_padding: bool = True) -> dict[Site, Tensor]:
    """``{site: rows [n, d]}`` of a cache ``acts`` of the batch ``inputs`` (its padding dropped)."""
    mask = attention_mask(inputs) if drop_padding else None
    return {s: flatten_rows(acts[s], s, mask, drop_padding) for s in sites}


def activations(model: nn.Module, inputs: Any, site: Site, batch_size: int = 256,
                drop_padding: bool = False) -> Tensor:
    """Rows ``[n_rows, d]`` of ``site``'s view on ``inputs``, without gradients.

    ``inputs`` is a token tensor ``[batch, pos]``, a feature tensor, a dict batch (with
    ``attention_mask``), or an iterable of any of these (run one by one). A tensor or dict
    is run in chunks of ``batch_size`` examples (each forward stops after the site). Use a
    site with one position per example (``positions="last"`` or an index tensor
    ``[batch, n]``, which is split with the chunks) to get ``[n_examples, d]``; with several
    positions every (example, position) becomes a row, in example-major order, padding
    included unless ``drop_padding``.
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
            out.append(site_rows(cache(model, chunk, [s]), chunk, [s], drop_padding)[s])
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
