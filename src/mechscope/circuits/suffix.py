"""Patching residual-stream cells by recomputing only what the patch can change.

In a causal transformer, patching the residual stream at position ``p`` before block
``l`` changes nothing at positions ``< p`` in any later block: their activations, keys
and values are the base run's. So a cell needs only the positions ``>= p`` of blocks
``l ..``, attending to the base run's keys and values for the earlier positions (what a
KV cache does), and in the last block only the positions the metric reads
(``readout``); logits at readout positions before ``p`` are the base run's own.

This is done for the zoo :class:`~mechscope.zoo.transformer.Transformer` (whose blocks
have ``forward_from``), on sites that are a whole block input or output. Cells are
grouped in chunks of nearby positions that share a forward, each chunk computed from its
first position (the copies whose cell lies later recompute a few unchanged positions, so
that batches stay large), and the cells of every site ride in the same chunk: a site's
copies join the batch at the block it feeds. The plan is verified once against the
model's own logits before it is trusted; anything else (Hugging Face models, other
modules, other sites) uses the general paths of :mod:`mechscope.circuits.patching`,
which give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.replay import chain, error_scale
from mechscope.core.site import Site
from mechscope.zoo.transformer import Block, Transformer

# a chunk of cells at positions s .. s+c-1 is computed from s (copies patched later
# recompute a few unchanged positions): c = ceil(WIDTH / (t - s)) keeps that waste small
# where suffixes are long and batches large where they are short
WIDTH = 32


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is the zoo transformer exactly (its forward is known to be blocks)."""
    return type(model) is Transformer and all(type(b) is Block for b in model.blocks)


def start_block(model: nn.Module, site: Site) -> int | None:
    """The first block a patch at ``site`` feeds (``n_layers``: only the unembedding), or
    None when ``site`` is not a whole block input / output."""
    if site.heads is not None or site.features is not None or site.positions is not None:
        return None
    parts = site.path.split(".")
    if len(parts) != 2 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    layer = int(parts[1])
    if layer >= len(model.blocks):
        return None
    if site.io == "input" and site.element in (None, 0, "x"):
        return layer
    if site.io == "output" and site.element is None:
        return layer + 1
    return None


def base_sites(model: nn.Module, first: int) -> list[Site]:
    """What the base run must keep: the keys and values of every block from ``first`` on."""
    return [Site(f"blocks.{j}.attn.{kv}") for j in range(first, len(model.blocks)) for kv in ("k", "v")]


@dataclass
class SuffixState:
    """The base run, as the replays need it."""

    model: nn.Module
    first: int  # the shallowest block whose keys and values are kept
    acts: dict[Site, Tensor]  # from base_sites(model, first)
    logits: Tensor  # [batch, pos, vocab] the base run's own output
    key_mask: Tensor | None  # [batch, pos] the base input's attention mask

    def __post_init__(self) -> None:  # per block: its keys and values [batch, pos, n_heads*d_head]
        self.kv = {j: (self.acts[Site(f"blocks.{j}.attn.k")], self.acts[Site(f"blocks.{j}.attn.v")])
                   for j in range(self.first, len(self.model.blocks))}

    def past(self, block: int, s: int) -> tuple[Tensor, Tensor]:  # keys and values of positions < s
        k, v = self.kv[block]
        return k[:, :s], v[:, :s]

    def logits_from(self, entries: Sequence[tuple[int, Tensor]], s: int, readout: Sequence[int] | None) -> Tensor:
        """Logits of copies of the batch patched at positions >= ``s``, at the readout
        positions (all when None): [rows, n_readout, vocab].

        ``entries``: (block, x) sorted by block, ``x`` [copies*batch, pos - s, d_model] the
        residual stream entering ``block`` (``n_layers``: the final norm) at positions s..;
        groups join the batch at their block, so rows come out in the order of ``entries``.
        """
        blocks, t, b = self.model.blocks, self.logits.shape[1], self.logits.shape[0]
        read = list(range(t)) if readout is None else [r % t for r in readout]
        late = [r for r in read if r >= s]
        rows = sum(e.shape[0] for _, e in entries)
        if not late:  # a patch at s or later cannot reach an earlier position
            return self.logits[:, read].repeat(rows // b, 1, 1)
        queries = torch.tensor([r - s for r in late], dtype=torch.long)
        x = None
        for j in range(entries[0][0], len(blocks) + 1):
            new = [e if j < len(blocks) else e[:, queries] for blk, e in entries if blk == j]
            if new:
                x = torch.cat(([] if x is None else [x]) + new) if len(new) > 1 or x is not None else new[0]
            if j < len(blocks):
                mask = None if self.key_mask is None else self.key_mask.repeat(x.shape[0] // b, 1)  # [rows, pos]
                x = blocks[j].forward_from(x, self.past(j, s), mask, queries if j == len(blocks) - 1 else None)
        new = chain((self.model.ln_final, self.model.unembed), x)  # [rows, len(late), vocab]
        if len(late) == len(read):
            return new
        early = [n for n, r in enumerate(read) if r < s]
        old = self.logits[:, [read[n] for n in early]].repeat(rows // b, 1, 1)  # unchanged by the patch
        order = early + [n for n, r in enumerate(read) if r >= s]  # where each column of cat belongs
        return torch.cat([old, new], 1)[:, torch.tensor(order).argsort()]  # [rows, len(read), vocab]


def plan(model: nn.Module, base: Any, first: int, acts: dict[Site, Tensor], logits: Tensor,
         anchor: tuple[int, Tensor]) -> SuffixState | None:
    """The state for replays from block ``first`` on; None when the base input is not
    one the replay knows, or the replay of ``anchor`` (a site's start block and its base
    activation [batch, pos, d_model]) on the first example from the middle position does
    not reproduce the model's own logits (the caller then uses the general paths)."""
    known = {"input_ids", "attention_mask", "position_ids"}  # the zoo transformer's own arguments
    if not (isinstance(base, Tensor) or isinstance(base, dict) and set(base) <= known):
        return None  # inputs whose attention mask the replay could not find
    mask = base.get("attention_mask") if isinstance(base, dict) else None
    state = SuffixState(model, first, acts, logits, mask)
    one = SuffixState(model, first, {site: a[:1] for site, a in acts.items()}, logits[:1],
                      None if mask is None else mask[:1])
    block, act = anchor
    s = logits.shape[1] // 2
    with torch.no_grad():
        got = one.logits_from([(block, act[:1, s:])], s, None)  # [1, pos, vocab]
    err, scale = error_scale(got, logits[:1])
    return state if err <= 1e-4 * scale else None


Cells = Sequence[tuple[int, int, int]]  # (cell index, start block, position)


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


def patch(state: SuffixState, cells: Cells, base_acts: Mapping[int, Tensor],
          sources: Mapping[int, Tensor], score: Callable[[int, Tensor], None], k_max: int,
          readout: Sequence[int] | None) -> None:
    """Patch every (cell index, start block, position): cell i writes ``sources[i]`` at its
    position into ``base_acts[i]`` (the site's activations on the source and base runs,
    [batch, pos, d_model]) and ``score(i, logits)`` gets its logits [batch, n_readout, vocab].

    A chunk holds cells of every site at nearby positions: a site's copies join the batch
    at the block their site feeds, so deeper sites ride along with shallower ones.
    """
    b, t = state.logits.shape[:2]
    for chunk in chunks([(i, block, p % t) for i, block, p in cells], k_max, t):
        s = chunk[0][2]
        chunk = sorted(chunk, key=lambda c: c[1])  # by start block, as logits_from wants
        entries, order = [], []
        for block in dict.fromkeys(c[1] for c in chunk):
            mine = [c for c in chunk if c[1] == block]
            x = torch.stack([base_acts[i][:, s:] for i, _, _ in mine])  # [copies, batch, pos - s, d]
            for j, (i, _, p) in enumerate(mine):
                x[j, :, p - s] = sources[i][:, p]
            entries.append((block, x.flatten(0, 1)))
            order += [i for i, _, _ in mine]
        logits = state.logits_from(entries, s, readout)  # [len(chunk)*batch, n_readout, vocab]
        for j, i in enumerate(order):
            score(i, logits[j * b:(j + 1) * b])
