"""Patching residual-stream cells by recomputing only what the patch can change.

A residual-stream cell at position ``p`` before block ``l`` needs only positions ``>= p``
of blocks ``l ..``, from the base run's keys and values, and the logits the metric reads
(:mod:`mechscope.core.suffix`: the built-in transformer's ``forward_from``, or a Hugging
Face model's own forward with its KV cache cut at ``p``; one state, verified once against
the model's own logits). This module chooses what shares a forward: cells are grouped in
chunks of nearby positions, each chunk computed from its first position (copies whose cell
lies later recompute a few unchanged positions, so that batches stay large), and the cells
of every site ride in the same chunk: a site's copies join the batch at the block it feeds
(on a Hugging Face model, one call of the model per start block). A head's cell starts at
its block from the block's residual input and writes the head's slice of the attention output
projection's input while that block is replayed.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from mechscope.core.aliases import resid_pre
from mechscope.core.site import Site
from mechscope.core.structure import ModelStructure
from mechscope.core.suffix import Suffix, start_block

# a chunk of cells at positions s .. s+c-1 is computed from s (copies patched later
# recompute a few unchanged positions): c = ceil(WIDTH / (t - s)) keeps that waste small
# where suffixes are long and batches large where they are short
WIDTH = 32

Cells = Sequence[tuple[int, int, int]]  # (cell index, start block, position)


def feeds(s: ModelStructure, site: Site) -> tuple[int, Site] | None:
    """(the block a patch at ``site`` starts the replay at, the residual site whose base
    activation enters it), or None where the suffix replay cannot patch ``site``: a block's
    input or output, or heads of a block's attention output projection (their slice of its
    input, written while the block is replayed)."""
    block = start_block(s, site)
    if block is not None:
        return block, site
    if (site.heads is None or site.head_dim is None or site.features is not None or site.positions is not None
            or site.io != "input" or site.element not in (None, 0)):
        return None
    for layer, b in enumerate(s.blocks):
        if b.attn_out_proj is not None and site.path == b.attn_out_proj:
            return layer, resid_pre(s, layer).replace(name=None)
    return None


def chunks(cells: Cells, k_max: int, t: int, width: int | None = None) -> list[list[tuple[int, int, int]]]:
    """(cell index, start block, position) triples sorted by position, cut into chunks of
    at most ``k_max`` cells. A chunk from position s spans ceil(width / (t - s)) positions:
    one where the suffix is long (its recomputed positions would be waste), more near the
    end, where a forward is short and its fixed cost would dominate."""
    width = WIDTH if width is None else width
    out: list[list[tuple[int, int, int]]] = []
    for cell in sorted(cells, key=lambda c: c[2]):
        if out:
            s = out[-1][0][2]
            if len(out[-1]) < k_max and cell[2] - s < -(-width // (t - s)):
                out[-1].append(cell)
                continue
        out.append([cell])
    return out


def patch(state: Suffix, cells: Cells, base_acts: Mapping[int, Tensor], sources: Mapping[int, Tensor],
          score: Callable[[int, Tensor], None], k_max: int, heads: Mapping[int, Site] | None = None) -> None:
    """Patch every (cell index, start block, position): cell i writes ``sources[i]`` at its
    position into ``base_acts[i]`` (the site's activations on the source and base runs,
    [batch, pos, d_model]) and ``score(i, logits)`` gets its logits [batch, n_read, vocab].
    A head cell (``heads[i]``, its site) starts at its block from the block's residual
    input (``base_acts[i]``) and writes ``sources[i]`` (the site's view, [batch, pos, heads,
    d_head]) into the output projection's input while the block is replayed.

    A chunk holds cells of every site at nearby positions: a site's copies join the batch
    at the block their site feeds, so deeper sites ride along with shallower ones.
    """
    b, t, heads = state.batch, state.t, heads or {}
    for chunk in chunks([(i, block, p % t) for i, block, p in cells], k_max, t):
        s = chunk[0][2]
        chunk = sorted(chunk, key=lambda c: c[1])  # by start block, as logits_from wants
        entries, order, inside = [], [], {}
        for block in dict.fromkeys(c[1] for c in chunk):
            mine = [c for c in chunk if c[1] == block]
            x = torch.stack([base_acts[i][:, s:] for i, _, _ in mine])  # [copies, batch, pos - s, d]
            writes = []
            for j, (i, _, p) in enumerate(mine):
                if i in heads:
                    writes.append((j, p - s, heads[i], sources[i][:, p]))
                else:
                    x[j, :, p - s] = sources[i][:, p]
            if writes:
                inside[len(entries)] = [(writes[0][2].path, _head_writes(writes, b))]
            entries.append((block, x.flatten(0, 1)))
            order += [i for i, _, _ in mine]
        logits = state.logits_from(entries, s, inside)  # [len(chunk)*batch, n_read, vocab]
        for j, i in enumerate(order):
            score(i, logits[j * b:(j + 1) * b])


def _head_writes(writes: list[tuple[int, int, Site, Tensor]], b: int) -> Callable[[Tensor], Tensor]:
    """The write into one block's output-projection input [copies*batch, pos - s, width]:
    copy j's heads at local position q take the source's values [batch, heads, d_head]."""
    def fn(rows: Tensor) -> Tensor:
        for j, q, site, value in writes:
            view = rows.view(rows.shape[0] // b, b, rows.shape[1], -1, site.head_dim)  # [copies, batch, pos, heads, dh]
            view[j, :, q, list(site.heads)] = value.to(rows.dtype)
        return rows
    return fn
