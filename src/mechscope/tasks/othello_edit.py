"""Editing the Othello world model's board along its probe directions (Li et al. 2023;
Nanda, Lee & Wattenberg 2023).

An edit flips one square (mine <-> theirs) in the residual stream at the position of a
game's move, with the relative probes of :mod:`mechscope.tasks.othello` fitted at the
edited layers, and succeeds when the model's top-k next moves are exactly the legal
moves of the *edited* board. Random directions of the same length are the control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechscope.core.run import run
from mechscope.core.site import Site
from mechscope.tasks.othello import Games, MODEL, SIZE, _to_tokens, legal_moves, predicted_set, relative_states
from mechscope.zoo.transformer import Transformer


@dataclass(frozen=True)
class EditCases:
    """Positions to edit: flip ``square`` (mine <-> theirs) in game ``game`` after move ``pos``.

    ``source`` / ``target``: the square's relative class before / after (1 mine, 2 theirs);
    ``legal_edited`` [N, 32] the legal next moves on the edited board; ``legal_clean`` on the real one.
    """

    game: Tensor
    pos: Tensor
    square: Tensor
    source: Tensor
    target: Tensor
    legal_clean: Tensor
    legal_edited: Tensor


def edit_cases(games: Games, n: int, seed: int = 0, min_pos: int = 6, max_pos: int = 26) -> EditCases:
    """``n`` edits of mid-game positions whose flip changes the set of legal next moves."""
    gen = torch.Generator().manual_seed(seed)
    rel = relative_states(games)
    picked: list[tuple[int, int, int]] = []
    tries = 0
    while len(picked) < n and tries < 50 * n:
        tries += 1
        g = int(torch.randint(games.tokens.shape[0], (1,), generator=gen))
        t = int(torch.randint(min_pos, max_pos + 1, (1,), generator=gen))
        if t >= int(games.length[g]) or int(games.next_player[g, t]) == 0:
            continue
        occupied = torch.nonzero(rel[g, t] != 0).flatten()
        sq = int(occupied[torch.randint(len(occupied), (1,), generator=gen)])
        board = games.boards[g, t].clone().view(1, SIZE, SIZE)
        board.view(-1)[sq] = -board.view(-1)[sq]
        player = games.next_player[g, t].view(1)
        edited = _to_tokens(legal_moves(board, player))[0]
        if edited.any() and not torch.equal(edited, games.legal_next[g, t]):
            picked.append((g, t, sq))
    if len(picked) < n:
        raise ValueError(f"found only {len(picked)} positions whose flip changes the legal moves; give more games")
    g, t, sq = (torch.tensor(v) for v in zip(*picked))
    src = rel[g, t, sq]
    boards = games.boards[g, t].clone()
    boards[torch.arange(n), sq] = -boards[torch.arange(n), sq]
    edited = _to_tokens(legal_moves(boards.view(n, SIZE, SIZE), games.next_player[g, t]))
    return EditCases(g, t, sq, src, 3 - src, games.legal_next[g, t], edited)


# probe logits of the target class over the source after an edit; chosen with edit_layers() on tuning games
# (seed 50_000, 400 edits, the 30k-step world model; kept for the 45k one): success 0.74 at margin 4, 0.78 at 6, 0.77 at 8, 0.72 at 10; 0.45 mirroring
EDIT_MARGIN = 6.0


@dataclass(frozen=True, eq=False)
class SetMargin:
    """An intervention: per example, move ``x`` along the probe's ``target - source`` direction until
    the probe's margin of ``target`` over ``source`` is ``margin``.

    ``normal`` [batch, d] is ``D_target - D_source`` and ``offset`` [batch] the bias difference of the
    probe (raw activation space), so that the margin is ``x . normal + offset``; the edit adds
    ``(margin - x . normal - offset) * normal / |normal|^2``, the smallest displacement that gives
    the probe that margin. This is Li et al.'s edit (push the probe to a confident prediction of
    the target class) in closed form for a linear probe. ``margin=None`` mirrors the current
    margin instead (Nanda et al.'s flip); applied at several layers in a row, mirroring undoes an
    earlier layer's edit wherever that edit carried through to the next layer.

    ``record``: a list the displacement lengths [batch] are appended to. With ``random`` [batch, d]
    (unit directions) the edit moves along it instead, by ``length`` [batch] if given (the real
    edit's lengths: the random-direction control) or else by the probe edit's own length.
    """

    normal: Tensor
    offset: Tensor
    margin: float | None = EDIT_MARGIN
    random: Tensor | None = None
    length: Tensor | None = None
    record: list | None = None

    def __call__(self, view: Tensor, call: Any = None) -> Tensor:  # view [batch, 1, d]
        x = view[:, 0].double()
        g = self.normal.double()
        now = (x * g).sum(-1) + self.offset.double()  # [batch] target-over-source margin
        goal = -now if self.margin is None else torch.full_like(now, self.margin)
        step = (goal - now)[:, None] * g / (g * g).sum(-1, keepdim=True)  # [batch, d]
        if self.random is not None:
            size = self.length.double() if self.length is not None else step.norm(dim=-1)
            step = self.random.double() * size[:, None]
        if self.record is not None:
            self.record.append(step.norm(dim=-1))
        return (x + step).to(view.dtype)[:, None]


def edit_layers() -> list[int]:
    """Where the edit goes: every layer from a third of the depth on, 2..5 (Li et al. edit from a middle
    layer to the last), chosen with :data:`EDIT_MARGIN` on tuning games that the bench never scores
    (docs/results.md, "Othello world model")."""
    return list(range(MODEL.n_layers // 3, MODEL.n_layers))


def _edit_plan(probes: dict[int, Any], cases: EditCases, margin: float | None, random_seed: int | None,
               lengths: list[Tensor] | None, record: list | None) -> list[tuple[Any, SetMargin]]:
    n = len(cases.game)
    plan = []
    for i, (layer, probe) in enumerate(probes.items()):
        dirs = probe.directions()  # [36, d, 3] raw-space directions per square
        beta = probe.bias - (probe.mean[None, :, None] * dirs).sum(1)  # [36, 3] raw-space bias
        normal = dirs[cases.square, :, cases.target] - dirs[cases.square, :, cases.source]  # [n, d]
        off = beta[cases.square, cases.target] - beta[cases.square, cases.source]
        rnd = None
        if random_seed is not None:
            rnd = torch.randn(n, normal.shape[1], generator=torch.Generator().manual_seed(random_seed + layer))
            rnd = rnd / rnd.norm(dim=-1, keepdim=True)
        edit = SetMargin(normal, off, margin, rnd, None if lengths is None else lengths[i], record)
        plan.append((Site(f"blocks.{layer}", positions=cases.pos[:, None]), edit))
    return plan


def probe_edit(model: Transformer, games: Games, cases: EditCases, probes: dict[int, Any],
               margin: float | None = EDIT_MARGIN, random_seed: int | None = None) -> dict[str, Any]:
    """Run every case with the square flipped along the relative probes of ``probes`` ({layer: LinearProbe},
    applied in layer order at the edited position; see :class:`SetMargin`).

    Success: the model's top-k moves (k = number of legal moves on the edited board) are exactly
    the edited board's legal moves. Returns the success rate, the mean number of wrong moves
    (Li et al.'s error count) and the same for the unedited model against the edited board;
    ``clean_board_known`` is the fraction of cases whose real board the unedited model gets exactly
    right, and ``*_success_where_known`` the success rates on those cases alone. With ``random_seed``,
    also ``random_*``: the same edits, each layer's displacement of the same length as the probe
    edit's there, along random directions. ``edit_length``: mean displacement length per layer.
    """
    probes = dict(sorted(probes.items()))  # layer order: the order the forward pass records the lengths in
    n = len(cases.game)
    rows = torch.arange(n)
    tokens = games.tokens[cases.game]
    lengths: list[Tensor] = []
    with torch.no_grad():
        edited = run(model, tokens, _edit_plan(probes, cases, margin, None, None, lengths))[0][rows, cases.pos]
        clean = model(tokens)[rows, cases.pos]
        runs = {"edited": edited, "clean": clean}
        if random_seed is not None:
            plan = _edit_plan(probes, cases, margin, random_seed, lengths, None)
            runs["random"] = run(model, tokens, plan)[0][rows, cases.pos]
    k = cases.legal_edited.sum(-1)
    # the cases where the unedited model gets the real board's legal moves exactly: there a failed
    # edit is the edit's fault, not the world model's
    knows = (predicted_set(clean, cases.legal_clean.sum(-1)) & ~cases.legal_clean).sum(-1) == 0
    out: dict[str, Any] = {"clean_board_known": float(knows.double().mean()),
                           "edit_length": {l: float(v.mean()) for l, v in zip(probes, lengths)}}
    for name, logits in runs.items():
        pred = predicted_set(logits, k)
        wrong = (pred & ~cases.legal_edited).sum(-1)
        out[f"{name}_success"] = float((wrong == 0).double().mean())
        out[f"{name}_errors"] = float(wrong.double().mean())
        out[f"{name}_success_where_known"] = float((wrong[knows] == 0).double().mean()) if knows.any() else float("nan")
    return out
