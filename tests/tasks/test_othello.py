"""Othello 6x6: the vectorised rules against a plain reference implementation, the games, the
two codings of the board, edits, and the shipped world model."""

import torch

from mechscope.tasks import othello as o
from mechscope.tasks import othello_edit as oe

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
    cases = oe.edit_cases(games, 20, seed=0)
    assert not bool((cases.legal_edited == cases.legal_clean).all(-1).any())
    assert bool(((cases.source == 1) | (cases.source == 2)).all()) and torch.equal(cases.target, 3 - cases.source)


def test_predicted_set_takes_the_top_k():
    logits = torch.tensor([[0.0] * 30 + [5.0, 4.0, 0.0]])
    assert torch.nonzero(o.predicted_set(logits, torch.tensor([2]))[0]).flatten().tolist() == [30, 31]


def _margin(v, g, off):  # the probe's target-over-source margin of [batch, 1, d] activations
    return (v[:, 0].double() * g.double()).sum(-1) + off.double()


def test_set_margin_sets_the_probe_margin_with_the_smallest_step():
    torch.manual_seed(0)
    g, off, x = torch.randn(3, 8), torch.randn(3), torch.randn(3, 1, 8)
    edited = oe.SetMargin(g, off, margin=6.0)(x)
    assert torch.allclose(_margin(edited, g, off), torch.full((3,), 6.0, dtype=torch.float64), atol=1e-4)
    step = (edited - x)[:, 0]
    assert torch.allclose(torch.nn.functional.cosine_similarity(step, g).abs(), torch.ones(3), atol=1e-5)  # along g only
    # setting a margin is idempotent, so editing layer after layer does not undo an edit that carried
    # through; mirroring twice gives the original back
    assert torch.allclose(oe.SetMargin(g, off, margin=6.0)(edited), edited, atol=1e-5)
    mirrored = oe.SetMargin(g, off, margin=None)(x)
    assert torch.allclose(_margin(mirrored, g, off), -_margin(x, g, off), atol=1e-4)
    assert torch.allclose(oe.SetMargin(g, off, margin=None)(mirrored), x, atol=1e-5)


def test_random_control_moves_by_the_real_edit_lengths():
    torch.manual_seed(1)
    g, off, x = torch.randn(4, 8), torch.randn(4), torch.randn(4, 1, 8)
    record: list = []
    edited = oe.SetMargin(g, off, margin=6.0, record=record)(x)
    assert len(record) == 1 and torch.allclose(record[0], (edited - x)[:, 0].norm(dim=-1).double(), atol=1e-5)
    rnd = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    moved = (oe.SetMargin(g, off, margin=6.0, random=rnd, length=record[0])(x) - x)[:, 0]
    assert torch.allclose(moved.norm(dim=-1), (edited - x)[:, 0].norm(dim=-1), atol=1e-5)  # same length
    assert torch.allclose(torch.nn.functional.cosine_similarity(moved, rnd), torch.ones(4), atol=1e-5)  # random way


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


def test_probe_edit_on_the_shipped_model_beats_random_directions():
    """The shipped world model follows probe edits far more often than random edits of the same lengths."""
    from mechscope.probe.linear import train_probe

    torch.set_num_threads(1)
    model = o.load()
    games = o.random_games(300, seed=7)
    game, pos = o.probe_rows(games, 6, seed=0)
    layers = oe.edit_layers()
    acts = o.residuals(model, games, layers, game, pos)
    rel = o.relative_states(games)[game, pos]
    probes = {l: train_probe(acts[l], rel, groups=game, l2_grid=(1e-2,), max_iter=100, dtype=torch.float32).probe
              for l in layers}
    cases = oe.edit_cases(games, 100, seed=0)
    out = oe.probe_edit(model, games, cases, probes, random_seed=0)
    assert set(out["edit_length"]) == set(layers) and all(v > 0 for v in out["edit_length"].values())
    assert out["edited_success"] > out["random_success"] + 0.2
    assert out["edited_success"] > out["clean_success"] + 0.2
    assert out["edited_errors"] < out["random_errors"]
