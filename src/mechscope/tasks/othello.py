"""Othello on a 6x6 board: a world model to probe (after Li et al. 2023; Nanda, Lee & Wattenberg 2023).

A small transformer is trained only on sequences of legal moves of random games (each
next move uniform among the legal ones). To predict which moves are legal it has to
track the board, which it never sees. Two codings of each square's state are probed:

- **absolute**: empty / black / white;
- **relative**: empty / mine / theirs, relative to the player about to move.

The published finding: linear probes read the relative coding far better than the
absolute one, and pushing the residual stream along the probe directions to flip a
square makes the model predict the legal moves of the *edited* board.

Game rules (standard Othello): black moves first; the four centre squares start
white (2,2), (3,3) and black (2,3), (3,2); a move must flip at least one line of the
opponent's discs; a player with no legal move passes (no token: the other player
moves again); the game ends when neither can move. Moves are tokens 0..31 (the 32
non-centre squares in row-major order); ``PAD`` = 32.

Everything is vectorised over games with torch; the board is ``[games, 6, 6]`` with
0 empty, 1 black, -1 white.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.zoo.transformer import Transformer, TransformerConfig

SIZE = 6
N_SQUARES = SIZE * SIZE
CENTRE = (14, 15, 20, 21)  # (2,2) (2,3) (3,2) (3,3)
PLAYABLE = [s for s in range(N_SQUARES) if s not in CENTRE]  # token -> square
TOKEN_OF = {sq: t for t, sq in enumerate(PLAYABLE)}
N_MOVES = len(PLAYABLE)  # 32
PAD = N_MOVES
VOCAB = N_MOVES + 1
MAX_LEN = N_MOVES  # at most one move per non-centre square
EMPTY, BLACK, WHITE = 0, 1, -1
_DIRS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / "othello.safetensors"
MODEL = TransformerConfig(vocab=VOCAB, n_ctx=MAX_LEN, d_model=128, n_layers=4, n_heads=4, d_head=32, d_mlp=512)


# --------------------------------------------------------------------------- rules
def initial_board(n: int) -> Tensor:  # [n, 6, 6]
    b = torch.zeros(n, SIZE, SIZE, dtype=torch.int8)
    b[:, 2, 2] = b[:, 3, 3] = WHITE
    b[:, 2, 3] = b[:, 3, 2] = BLACK
    return b


def _steps() -> Tensor:
    """``STEPS[d, j, s]``: the square ``j + 1`` steps from square ``s`` in direction ``d`` (-1 off the board)."""
    out = torch.full((len(_DIRS), SIZE - 1, N_SQUARES), -1, dtype=torch.long)
    for d, (dr, dc) in enumerate(_DIRS):
        for j in range(1, SIZE):
            for s in range(N_SQUARES):
                r, c = divmod(s, SIZE)
                rr, cc = r + j * dr, c + j * dc
                if 0 <= rr < SIZE and 0 <= cc < SIZE:
                    out[d, j - 1, s] = rr * SIZE + cc
    return out


STEPS = _steps()


def _flips(board: Tensor, player: Tensor) -> Tensor:
    """``[n, 36 (move square), 36 (flipped square)]``: the discs a move on each square would flip.

    Along each direction from an empty move square, the discs at steps 1..j are flipped
    when they are all the opponent's and the first square after them is the mover's.
    """
    n = board.shape[0]
    flat = board.view(n, N_SQUARES)
    pad = torch.cat([flat, torch.zeros(n, 1, dtype=flat.dtype)], 1)  # index -1 (off board) reads 0
    me, them = player.to(flat.dtype)[:, None], -player.to(flat.dtype)[:, None]
    flips = torch.zeros(n, N_SQUARES, N_SQUARES, dtype=torch.bool)
    src = torch.arange(N_SQUARES)
    for d in range(len(_DIRS)):
        at = pad[:, STEPS[d]]  # [n, 5, 36] value j+1 steps away from each square
        opp = at == them[:, :, None]
        run_ = opp.cumprod(1).bool()  # [n, 5, 36]: steps 1..j all opponent
        own_next = torch.cat([at[:, 1:] == me[:, :, None], torch.zeros(n, 1, N_SQUARES, dtype=torch.bool)], 1)
        closes = run_ & own_next  # the run of j opponent discs is closed by an own disc at j+1
        closed = closes.flip(1).cummax(1).values.flip(1)  # some run of length >= j closes
        for j in range(SIZE - 1):
            hit = run_[:, j] & closed[:, j]  # [n, 36]
            ok = STEPS[d, j] >= 0
            flips[:, src[ok], STEPS[d, j][ok]] |= hit[:, ok]
    return flips & (flat == EMPTY)[:, :, None]


def legal_moves(board: Tensor, player: Tensor) -> Tensor:  # [n, 36] bool
    """Squares where ``player`` [n] (1 black, -1 white) may move."""
    return _flips(board, player).any(-1)


def play(board: Tensor, player: Tensor, square: Tensor) -> Tensor:
    """Boards after ``player`` moves at ``square`` [n] (row-major index; -1 = no move, board unchanged)."""
    n = board.shape[0]
    flat = board.reshape(n, N_SQUARES).clone()
    moving = square >= 0
    sq = square.clamp(min=0)
    flipped = _flips(board, player)[torch.arange(n), sq] & moving[:, None]  # [n, 36]
    p = player.to(flat.dtype)[:, None]
    flat = torch.where(flipped, p, flat)
    flat[moving, sq[moving]] = p[moving, 0]
    return flat.view(n, SIZE, SIZE)


# --------------------------------------------------------------------------- games
@dataclass(frozen=True)
class Games:
    """Random legal games, padded to :data:`MAX_LEN` moves.

    ``tokens`` [n, T] move tokens (``PAD`` after the end); ``length`` [n];
    ``boards`` [n, T, 36] the board after each move (absolute: 0 / 1 black / -1 white);
    ``mover`` [n, T] who made each move; ``next_player`` [n, T] who moves next (0 when the game is over);
    ``legal_next`` [n, T, 32] the legal move tokens for the next move.
    """

    tokens: Tensor
    length: Tensor
    boards: Tensor
    mover: Tensor
    next_player: Tensor
    legal_next: Tensor

    @property
    def valid(self) -> Tensor:  # [n, T] real moves
        return torch.arange(MAX_LEN)[None, :] < self.length[:, None]


def _to_tokens(square_mask: Tensor) -> Tensor:  # [..., 36] -> [..., 32]
    return square_mask[..., PLAYABLE]


def _next_player(board: Tensor, player: Tensor) -> tuple[Tensor, Tensor]:
    """Who moves after ``player``'s opponent's turn: the opponent if it can, else ``player`` again, else 0."""
    opp = -player
    can_opp = legal_moves(board, opp).any(-1)
    can_me = legal_moves(board, player).any(-1)
    nxt = torch.where(can_opp, opp, torch.where(can_me, player, torch.zeros_like(player)))
    legal = torch.where((nxt != 0)[:, None], legal_moves(board, torch.where(nxt == 0, player, nxt)),
                        torch.zeros(board.shape[0], N_SQUARES, dtype=torch.bool))
    return nxt, legal


def random_games(n: int, seed: int = 0) -> Games:
    """``n`` games whose every move is uniform among the legal ones."""
    gen = torch.Generator().manual_seed(seed)
    board = initial_board(n)
    player = torch.full((n,), BLACK, dtype=torch.long)
    legal = legal_moves(board, player)
    tokens = torch.full((n, MAX_LEN), PAD, dtype=torch.long)
    boards = torch.zeros(n, MAX_LEN, N_SQUARES, dtype=torch.int8)
    mover = torch.zeros(n, MAX_LEN, dtype=torch.long)
    next_player = torch.zeros(n, MAX_LEN, dtype=torch.long)
    legal_next = torch.zeros(n, MAX_LEN, N_MOVES, dtype=torch.bool)
    length = torch.zeros(n, dtype=torch.long)
    for t in range(MAX_LEN):
        alive = player != 0
        if not bool(alive.any()):
            break
        weights = _to_tokens(legal).double() + (~alive)[:, None].double()  # dead games draw anything, unused
        tok = torch.multinomial(weights, 1, generator=gen)[:, 0]
        square = torch.tensor(PLAYABLE)[tok]
        board = play(board, player, torch.where(alive, square, torch.full_like(square, -1)))
        tokens[alive, t] = tok[alive]
        boards[:, t] = board.view(n, N_SQUARES)
        mover[:, t] = torch.where(alive, player, torch.zeros_like(player))
        length += alive.long()
        nxt, legal = _next_player(board, torch.where(alive, player, torch.ones_like(player)))
        player = torch.where(alive, nxt, torch.zeros_like(player))
        next_player[:, t] = player
        legal_next[:, t] = _to_tokens(legal) & alive[:, None]
    return Games(tokens, length, boards, mover, next_player, legal_next)


def relative_states(games: Games) -> Tensor:  # [n, T, 36] in {0 empty, 1 mine, 2 theirs}
    """Each square relative to the player about to move (the mover of the last move when the game is over)."""
    to_move = torch.where(games.next_player != 0, games.next_player, -games.mover)[..., None]
    b = games.boards.long()
    return torch.where(b == 0, 0, torch.where(b == to_move, 1, 2))


def absolute_states(games: Games) -> Tensor:  # [n, T, 36] in {0 empty, 1 black, 2 white}
    b = games.boards.long()
    return torch.where(b == 0, 0, torch.where(b == BLACK, 1, 2))
