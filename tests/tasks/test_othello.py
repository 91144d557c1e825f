"""Othello 6x6: the vectorised rules against a plain reference implementation, the games, the
two codings of the board, edits, and the shipped world model."""

import torch

from mechscope.tasks import othello as o

DIRS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def ref_flips(board, player, r, c):
    """The discs a move at (r, c) flips: a plain, loop-by-loop implementation."""
    if board[r][c] != 0:
        return []
    out = []
    for dr, dc in DIRS:
        line, rr, cc = [], r + dr, c + dc
        while 0 <= rr < 6 and 0 <= cc < 6 and board[rr][cc] == -player:
            line.append((rr, cc))
            rr, cc = rr + dr, cc + dc
        if line and 0 <= rr < 6 and 0 <= cc < 6 and board[rr][cc] == player:
            out += line
    return out


def ref_play_game(moves):
    board = [[0] * 6 for _ in range(6)]
    board[2][2] = board[3][3] = -1
    board[2][3] = board[3][2] = 1
    player, boards, legal_sets = 1, [], []
    for tok in moves:
        sq = o.PLAYABLE[tok]
        r, c = divmod(sq, 6)
        flips = ref_flips(board, player, r, c)
        assert flips, "the vectorised games made an illegal move"
        for rr, cc in flips:
            board[rr][cc] = player
        board[r][c] = player
        boards.append([v for row in board for v in row])

        def legal(p):
            return {o.TOKEN_OF[rr * 6 + cc] for rr in range(6) for cc in range(6) if ref_flips(board, p, rr, cc)}
        nxt = -player if legal(-player) else (player if legal(player) else 0)
        legal_sets.append(legal(nxt) if nxt else set())
        player = nxt
    return boards, legal_sets


def test_initial_legal_moves():
    legal = o.legal_moves(o.initial_board(1), torch.tensor([o.BLACK]))[0]
    assert sorted(torch.nonzero(legal).flatten().tolist()) == [8, 13, 22, 27]  # (1,2) (2,1) (3,4) (4,3)


def test_random_games_follow_the_reference_rules():
    games = o.random_games(40, seed=2)
    for g in range(40):
        n = int(games.length[g])
        boards, legal_sets = ref_play_game(games.tokens[g, :n].tolist())
        assert games.boards[g, :n].tolist() == boards
        got = [set(torch.nonzero(games.legal_next[g, t]).flatten().tolist()) for t in range(n)]
        assert got == legal_sets
    assert bool((games.tokens[games.valid] < o.N_MOVES).all())
    assert bool((games.tokens[~games.valid] == o.PAD).all())


def test_relative_and_absolute_codings():
    games = o.random_games(20, seed=1)
    rel, ab = o.relative_states(games), o.absolute_states(games)
    assert torch.equal(rel == 0, ab == 0)
    to_move = games.next_player
    # where black is to move, "mine" is black; where white is to move, "mine" is white
    black_to_move = (to_move == o.BLACK)[..., None] & (ab != 0)
    assert torch.equal((rel == 1)[black_to_move], (ab == 1)[black_to_move])
    white_to_move = (to_move == o.WHITE)[..., None] & (ab != 0)
    assert torch.equal((rel == 1)[white_to_move], (ab == 2)[white_to_move])


def test_edit_cases_change_the_legal_moves():
    games = o.random_games(200, seed=3)
    cases = o.edit_cases(games, 20, seed=0)
    assert not bool((cases.legal_edited == cases.legal_clean).all(-1).any())
    assert bool(((cases.source == 1) | (cases.source == 2)).all()) and torch.equal(cases.target, 3 - cases.source)


def test_predicted_set_takes_the_top_k():
    logits = torch.tensor([[0.0] * 30 + [5.0, 4.0, 0.0]])
    assert torch.nonzero(o.predicted_set(logits, torch.tensor([2]))[0]).flatten().tolist() == [30, 31]


def test_reflect_mirrors_the_margin():
    g = torch.randn(3, 8)
    off = torch.randn(3)
    x = torch.randn(3, 1, 8)
    edited = o.Reflect(g, off)(x)
    margin = lambda v: (v[:, 0] * g).sum(-1) + off  # noqa: E731
    assert torch.allclose(margin(edited), -margin(x), atol=1e-5)
    rnd = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    moved = o.Reflect(g, off, rnd)(x) - x
    assert torch.allclose(moved.norm(dim=-1), (edited - x).norm(dim=-1), atol=1e-5)  # same length, random way


class _Oracle:
    """A stand-in world model whose logits are read off the true legal moves of known games."""

    def __init__(self, games, demote=None):
        self.games, self.demote = games, demote

    def __call__(self, tokens):
        assert torch.equal(tokens, self.games.tokens)
        logits = torch.full((*tokens.shape, o.VOCAB), -30.0)
        logits[..., :o.N_MOVES] = torch.where(self.games.legal_next, 30.0, -30.0)
        if self.demote is not None:  # one legal move of one position ranked below every illegal one
            g, t, m = self.demote
            logits[g, t, m] = -60.0
        return logits


def test_legal_quality_scores_an_oracle_and_counts_its_mistakes():
    games = o.random_games(30, seed=4)
    perfect = o.legal_quality(_Oracle(games), games)
    assert perfect["exact"] == 1.0 and perfect["errors"] == 0.0 and abs(perfect["kl"]) < 1e-6
    g, t = 0, 5
    legal = torch.nonzero(games.legal_next[g, t]).flatten()
    assert len(legal) < o.N_MOVES
    flawed = o.legal_quality(_Oracle(games, (g, t, int(legal[0]))), games)
    positions = int(games.legal_next.any(-1).sum())
    assert abs(flawed["exact"] - (1 - 1 / positions)) < 1e-9 and abs(flawed["errors"] - 1 / positions) < 1e-9
    assert flawed["kl"] > 0


def test_recipe_trains_with_bf16_autocast():
    recipe = o.Recipe(games=64, steps=30, batch=32, chunk=64, bf16=True)
    games = o.dataset(recipe.games, recipe.seed, recipe.chunk)
    with torch.no_grad():
        before = float(o.next_move_loss(o.build_model(recipe.seed)(games.tokens), games))
    model = o.train(recipe)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in float32
    with torch.no_grad():
        after = float(o.next_move_loss(model(games.tokens), games))
    assert after < before - 0.3
