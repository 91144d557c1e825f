"""Induction data, losses, the shipped checkpoints and the hand-set circuit model."""

import math

import pytest
import torch

from mechscope.core.config import ConfigError
from mechscope.tasks import induction


def test_sequences_repeat_with_their_period():
    periods = torch.tensor([3, 5])
    toks = induction.repeated_tokens(2, 5, 10, periods, torch.Generator().manual_seed(0))
    assert toks.shape == (2, 11) and bool((toks[:, 0] == induction.BOS).all())
    for row, p in zip(toks, periods.tolist()):
        body = row[1:]
        assert all(body[i] == body[i % p] for i in range(10))
    cfg = induction.InductionConfig(half_len=8, batch_size=64)
    batch = induction.training_batch(cfg, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 17) and int(batch[:, 1:].min()) >= 1


def test_corruption_changes_only_the_first_copy():
    toks = induction.eval_batch(induction.InductionConfig(), n=16)
    bad = induction.corrupt_first_copy(toks, 20, 64, torch.Generator().manual_seed(1))
    assert bool((bad[:, 1:21] != toks[:, 1:21]).all()) and torch.equal(bad[:, 21:], toks[:, 21:])
    assert int(bad.min()) >= 0 and int(bad.max()) < 64


def test_losses_read_the_right_positions():
    L, V = 4, 6
    toks = induction.repeated_tokens(3, L, V)
    perfect = torch.full((3, 2 * L + 1, V), -1e4)
    perfect[:, :-1].scatter_(2, toks[:, 1:, None], 1e4)  # logits at i put everything on token i+1
    assert induction.repeated_half_loss(perfect, toks, L).item() == pytest.approx(0.0)
    uniform = torch.zeros(3, 2 * L + 1, V)
    assert induction.first_half_loss(uniform, toks, L).item() == pytest.approx(math.log(V))
    assert induction.induction_metric(perfect, toks, L).item() > 1e3


def test_position_only_guess_is_ln_of_the_candidate_count_when_tokens_are_distinct():
    L = 20
    r = torch.randperm(63, generator=torch.Generator().manual_seed(0))[:L] + 1  # 20 distinct tokens
    toks = torch.cat([torch.tensor([induction.BOS]), r, r])[None]
    # every prediction of the repeat has 11 candidates (P = 10..20), one of them right
    assert induction.position_only_loss(toks, L) == pytest.approx(math.log(11), abs=1e-6)
    twice = torch.cat([torch.tensor([induction.BOS]), r[:10], r[:10], r[:10], r[:10]])[None]  # period 10
    # candidates at P = 10 and P = 20 both hold the right token: 2 of 11
    assert induction.position_only_loss(twice, L) == pytest.approx(math.log(11 / 2), abs=1e-6)


def test_shipped_models():
    two, cfg = induction.load(n_layers=2)
    one, _ = induction.load(n_layers=1)
    ev2, ev1 = induction.evaluate(two, cfg, n=64), induction.evaluate(one, cfg, n=64)
    assert ev2["repeated_half_loss"] < 0.5 < ev2["first_half_loss"]
    assert ev1["repeated_half_loss"] > ev2["repeated_half_loss"] + 1.0
    assert induction.checkpoint_path(2).stat().st_size < 2_000_000


def test_short_training_records_history():
    cfg = induction.InductionConfig(half_len=6, d_model=16, n_heads=2, d_head=8, steps=20, eval_every=10, batch_size=16)
    model, hist = induction.train_induction(cfg)
    assert hist["step"] == [0, 10, 20] and len(hist["repeated_half_loss"]) == 3
    assert hist["phase_change_step"] is None  # 20 steps is far too early


def test_hand_set_model_predicts_the_repeat():
    model, truth = induction.hand_set_model()
    toks = induction.repeated_tokens(64, 6, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(toks)
    assert induction.repeated_half_loss(logits, toks, 6) < 0.5 * induction.first_half_loss(logits, toks, 6)
    assert truth["heads"] == [(0, 0), (1, 0)]


def test_bad_input():
    with pytest.raises(ConfigError, match="half_len must be >= 4"):
        induction.InductionConfig(half_len=2)
    with pytest.raises(ConfigError, match="n_layers must be >= 1"):
        induction.InductionConfig(n_layers=0)
    with pytest.raises(ConfigError, match="no field"):
        induction.InductionConfig.from_dict({"layers": 2})


def test_train_command_lists_and_refuses_unknown_tasks(capsys):
    from mechscope.cli import main
    from mechscope.cli.train import resolve
    from mechscope.tasks.registry import names

    assert main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert "grokking" in out and "induction" in out
    assert main(["train", "grokkin"]) == 2
    assert "did you mean 'grokking'" in capsys.readouterr().err
    assert main(["train"]) == 2
    for name in names():  # every entry points at a real function
        assert callable(resolve(name))
