"""Othello on a 6x6 board: a world model to probe (after Li et al. 2023; Nanda, Lee & Wattenberg 2023).

A small transformer is trained only on sequences of legal moves of random games (each
next move uniform among the legal ones). To predict which moves are legal it has to
track the board, which it never sees. Two codings of each square's state are probed:

- **absolute**: empty / black / white;
- **relative**: empty / mine / theirs, relative to the player about to move.

The published finding: linear probes read the relative coding far better than the
absolute one, and pushing the residual stream along the probe directions to flip a
square makes the model predict the legal moves of the *edited* board (the edit:
:mod:`mechscope.tasks.othello_edit`).

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.zoo.recipes import load_shipped, save_shipped, train_steps
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
MODEL = TransformerConfig(vocab=VOCAB, n_ctx=MAX_LEN, d_model=96, n_layers=6, n_heads=4, d_head=24, d_mlp=192)


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


def _lines(at: Tensor, me: Tensor, them: Tensor) -> tuple[Tensor, Tensor]:
    """Along one direction, from values ``at`` [n, 5, ...] at steps 1..5: ``run`` (steps 1..j are all
    the opponent's) and ``flip`` (step j is flipped by the move: in a run closed further on)."""
    run_ = (at == them).cumprod(1).bool()
    own_next = torch.zeros_like(run_)
    own_next[:, :-1] = at[:, 1:] == me
    closes = run_ & own_next  # the run of j opponent discs ends at an own disc at j+1
    return run_, run_ & closes.flip(1).cummax(1).values.flip(1)


def _padded(board: Tensor) -> Tensor:  # [n, 37]: index -1 (off the board) reads empty
    flat = board.reshape(board.shape[0], N_SQUARES)
    return torch.cat([flat, torch.zeros(flat.shape[0], 1, dtype=flat.dtype)], 1)


def legal_moves(board: Tensor, player: Tensor) -> Tensor:  # [n, 36] bool
    """Squares where ``player`` [n] (1 black, -1 white) may move: empty, and flipping a line."""
    pad = _padded(board)
    me, them = player.to(pad.dtype)[:, None, None], -player.to(pad.dtype)[:, None, None]
    legal = torch.zeros(board.shape[0], N_SQUARES, dtype=torch.bool)
    for d in range(len(_DIRS)):
        _, flip = _lines(pad[:, STEPS[d]], me, them)  # [n, 5, 36]
        legal |= flip[:, 0]  # a line flips iff its first step flips
    return legal & (pad[:, :N_SQUARES] == EMPTY)


def play(board: Tensor, player: Tensor, square: Tensor) -> Tensor:
    """Boards after ``player`` moves at ``square`` [n] (row-major index; -1 = no move, board unchanged)."""
    n = board.shape[0]
    pad = _padded(board).clone()
    moving = square >= 0
    sq = square.clamp(min=0)
    me, them = player.to(pad.dtype)[:, None], -player.to(pad.dtype)[:, None]
    rows = torch.arange(n)[:, None]
    for d in range(len(_DIRS)):
        targets = STEPS[d][:, sq].T  # [n, 5] squares along the line (-1 off the board)
        _, flip = _lines(_padded(board)[rows, targets], me, them)  # [n, 5]
        flip &= moving[:, None]
        pad[rows.expand_as(targets)[flip], targets[flip]] = me.expand_as(targets)[flip]
    pad[moving, sq[moving]] = me[moving, 0]
    return pad[:, :N_SQUARES].reshape(n, SIZE, SIZE)


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
    legal_opp, legal_me = legal_moves(board, -player), legal_moves(board, player)
    can_opp, can_me = legal_opp.any(-1), legal_me.any(-1)
    nxt = torch.where(can_opp, -player, torch.where(can_me, player, torch.zeros_like(player)))
    legal = torch.where(can_opp[:, None], legal_opp, legal_me & can_me[:, None])
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


# --------------------------------------------------------------------------- the world model
@dataclass(frozen=True)
class Recipe:
    """Training of the world model. The target at each move is the exact distribution of the
    next move in the data (uniform over the legal moves): the expected next-token loss, with
    less variance than one sampled move.

    Compute is the limit here, so the recipe spends it where it measured best: a high peak
    learning rate, the forward pass in bfloat16 autocast (weights and optimiser stay float32),
    and, since the model underfits rather than overfits, more steps on more games. The
    measurements behind each choice are in docs/results.md ("Othello world model").
    """

    games: int = 225_000
    steps: int = 45_000
    batch: int = 64
    lr: float = 6e-3
    weight_decay: float = 0.01
    seed: int = 0
    chunk: int = 5000  # games generated at once
    bf16: bool = True  # autocast the forward pass to bfloat16


def build_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MODEL)


def dataset(n: int, seed: int = 0, chunk: int = 5000) -> Games:
    """``n`` random games, generated in chunks (each chunk seeded from ``seed``)."""
    parts = [random_games(min(chunk, n - i), seed * 1_000 + i // chunk) for i in range(0, n, chunk)]
    return Games(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Games)))


def next_move_loss(logits: Tensor, games: Games) -> Tensor:
    """Cross-entropy against the uniform distribution over the legal next moves (positions where one exists)."""
    legal = games.legal_next.float()  # [n, T, 32]
    has = legal.sum(-1) > 0
    target = legal / legal.sum(-1, keepdim=True).clamp_min(1)
    logp = logits[..., :N_MOVES].log_softmax(-1)
    return -(target * logp).sum(-1)[has].mean()


def _subset(games: Games, idx: Tensor) -> Games:
    return Games(*(getattr(games, f.name)[idx] for f in dataclasses.fields(Games)))


def train(recipe: Recipe = Recipe(), log: Any = None) -> Transformer:
    """Train the world model on random legal games (minutes on one thread)."""
    start = time.perf_counter()
    data = dataset(recipe.games, recipe.seed, recipe.chunk)
    model = build_model(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)

    def loss_at(step: int) -> Tensor:
        batch = _subset(data, torch.randint(recipe.games, (recipe.batch,), generator=gen))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            logits = model(batch.tokens)  # [batch, T, vocab]
        return next_move_loss(logits.float(), batch)

    if log:
        log(f"{recipe.games} games generated ({time.perf_counter() - start:.0f}s)")
    return train_steps(model, recipe, loss_at, pct_start=0.05, clip=1.0, log=log)


def save(model: Transformer, path: Path = CHECKPOINT, recipe: Recipe = Recipe()) -> None:
    save_shipped(path, model, MODEL, recipe)


def load(path: Path = CHECKPOINT) -> Transformer:
    """The shipped (or a retrained) world model, in eval mode."""
    return load_shipped(path, MODEL, "Othello", "othello")


@torch.no_grad()
def legal_top1(model: Transformer, games: Games) -> float:
    """Fraction of positions (with a next move) whose top prediction is a legal move."""
    top = model(games.tokens)[..., :N_MOVES].argmax(-1)  # [n, T]
    has = games.legal_next.any(-1)
    return float(games.legal_next.gather(2, top[..., None])[..., 0][has].double().mean())


@torch.no_grad()
def legal_quality(model: Transformer, games: Games) -> dict[str, float]:
    """How well the model knows the legal moves, over positions with a next move.

    ``exact``: its top-k moves (k = number of legal moves) are exactly the legal ones (the
    criterion the edit check uses, here on unedited boards); ``errors``: mean number of
    illegal moves among them; ``kl``: nats between the data's next-move distribution
    (uniform over the legal moves) and the model's.
    """
    logits = model(games.tokens)  # [n, T, vocab]
    legal = games.legal_next
    has = legal.any(-1)
    entropy = torch.log(legal.sum(-1)[has].double()).mean()
    pred = predicted_set(logits[has], legal.sum(-1)[has])
    wrong = (pred & ~legal[has]).sum(-1)
    return {"exact": float((wrong == 0).double().mean()), "errors": float(wrong.double().mean()),
            "kl": float(next_move_loss(logits, games) - entropy)}


def predicted_set(logits: Tensor, k: Tensor) -> Tensor:  # [n, 32] logits, [n] sizes -> [n, 32] bool
    """The model's ``k`` most likely moves, as a mask (its predicted legal moves)."""
    order = logits[..., :N_MOVES].argsort(-1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(N_MOVES).expand_as(order))
    return ranks < k[:, None]


# --------------------------------------------------------------------------- probing and editing
def probe_rows(games: Games, per_game: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``per_game`` random positions of each game where a player is to move: (game index, move index)."""
    gen = torch.Generator().manual_seed(seed)
    ok = games.next_player != 0  # [n, T]
    score = torch.rand(ok.shape, generator=gen).masked_fill(~ok, -1.0)
    pos = score.topk(per_game, dim=1).indices  # [n, per_game]
    keep = ok.gather(1, pos)
    game = torch.arange(ok.shape[0])[:, None].expand_as(pos)
    return game[keep], pos[keep]


@torch.no_grad()
def residuals(model: Transformer, games: Games, layers: list[int], game: Tensor, pos: Tensor,
              batch: int = 500) -> dict[int, Tensor]:
    """Residual stream after block ``l`` (``-1``: the embeddings) at the given rows: ``{l: [N, d]}``."""
    sites = {l: Site("blocks.0", io="input") if l == -1 else Site(f"blocks.{l}") for l in layers}
    out: dict[int, list[Tensor]] = {l: [] for l in layers}
    for start in range(0, len(game), batch):
        g, p = game[start:start + batch], pos[start:start + batch]
        acts = cache(model, games.tokens[g], list(sites.values()))
        for l, site in sites.items():
            out[l].append(acts[site][torch.arange(len(g)), p])  # [b, d]
    return {l: torch.cat(v) for l, v in out.items()}


def train_and_ship(out_dir: Path, log: Any = None) -> list[Path]:
    """``mechscope train``'s entry: train by :class:`Recipe` and write the checkpoint into ``out_dir``."""
    recipe = Recipe()
    path = Path(out_dir) / CHECKPOINT.name
    save(train(recipe, log=log), path, recipe)
    return [path]
