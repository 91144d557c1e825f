"""The real suite's pure helpers (no model needed, so these run in CI): the vocabulary subset,
the repeated random sequences, the scored columns, the head selections; and the real rows'
pre-registered criteria, which must not drift from issue 20's numbers."""

from pathlib import Path

import pytest
import torch

from mechscope.bench.catalog import load_catalog
from mechscope.bench.listing import rows_markdown
from mechscope.bench.real_data import (
    ascii_word_ids,
    control_draws,
    half_slices,
    repeated_tokens,
    top_heads,
)
from mechscope.bench.registry import REGISTRY

PIECES = ["<pad>", "<bos>", "\u2581the", "ing", "\u2581a", "\u2581of", "\u2581Paris", "\u2581caf\u00e9", "\u2581to",
          "\u2581x1", "\u2581and", "\u2581", "\u2581in"]


def test_ascii_word_ids_keeps_lowercase_ascii_word_starts_in_id_order():
    assert ascii_word_ids(PIECES, 4) == [2, 5, 8, 10]  # the, of, to, and: not "ing", "a", "Paris", "café", "x1"
    assert ascii_word_ids(PIECES, 5) == [2, 5, 8, 10, 12]
    with pytest.raises(ValueError, match="only 5 pieces"):
        ascii_word_ids(PIECES, 6)
    with pytest.raises(ValueError):
        ascii_word_ids(PIECES, 0)


def test_repeated_tokens_are_bos_then_one_copy_repeated():
    pool = list(range(100, 200))
    t = repeated_tokens(pool, n_seqs=6, period=10, bos=2, seed=0)
    assert t.shape == (6, 21) and t.dtype == torch.long
    assert (t[:, 0] == 2).all()
    assert torch.equal(t[:, 1:11], t[:, 11:])
    assert all(len(set(row[1:11].tolist())) == 10 for row in t)  # distinct within a copy
    assert set(t[:, 1:].flatten().tolist()) <= set(pool)
    assert torch.equal(t, repeated_tokens(pool, 6, 10, 2, seed=0))
    assert not torch.equal(t, repeated_tokens(pool, 6, 10, 2, seed=1))
    assert len({tuple(row.tolist()) for row in t}) == 6
    with pytest.raises(ValueError):
        repeated_tokens(pool, 2, 101, 2, seed=0)
    with pytest.raises(ValueError):
        repeated_tokens(pool, 2, 1, 2, seed=0)


def test_repeated_tokens_leave_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    repeated_tokens(list(range(50)), 4, 8, 0, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_half_slices_score_r2_to_rP_of_each_copy():
    period = 4
    tokens = torch.tensor([[99, 10, 11, 12, 13, 10, 11, 12, 13]])  # BOS r r
    first, second = half_slices(period)
    targets = tokens[:, 1:]  # column t predicts token t + 1
    assert targets[:, first].tolist() == [[11, 12, 13]]
    assert targets[:, second].tolist() == [[11, 12, 13]]
    assert list(range(2 * period))[second] == [5, 6, 7]  # the query sits on r_1..r_{P-1} of the second copy


def test_top_heads_best_first_as_layer_head_pairs():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.8]])
    assert top_heads(scores, 3) == [(0, 1), (1, 2), (1, 0)]
    assert top_heads(scores, 1) == [(0, 1)]


def test_control_draws_only_low_score_heads_not_excluded():
    scores = torch.tensor([[0.05, 0.9, 0.02, 0.5], [0.01, 0.09, 0.3, 0.0]])
    eligible, sets = control_draws(scores, k=3, below=0.1, draws=5, seed=0, exclude=[(1, 3)])
    assert eligible == [(0, 0), (0, 2), (1, 0), (1, 1)]
    assert len(sets) == 5 and all(len(s) == 3 and len(set(s)) == 3 and set(s) <= set(eligible) for s in sets)
    assert all(s == sorted(s) for s in sets)
    assert sets == control_draws(scores, 3, 0.1, 5, seed=0, exclude=[(1, 3)])[1]
    few, none = control_draws(scores, k=3, below=0.015, draws=5, seed=0)
    assert few == [(1, 0), (1, 3)] and none == []


def test_real_rows_keep_issue_20s_criteria():
    assert load_catalog(suite="real") == []
    rows = {(c.task, c.method): c for c in REGISTRY if c.suite == "real"}
    induction, ablation = ("real_induction", "repeated_tokens"), ("real_induction", "head_ablation")
    structure = ("real_structure", "writes_and_cache")
    expected = {
        (induction, "second_half_loss_ratio"): ("finding", "<=", 0.3),
        (induction, "best_induction_stripe"): ("finding", ">=", 0.4),
        (ablation, "top3_zero_ablation_rise"): ("finding", ">=", 1.0),
        (ablation, "random3_zero_ablation_rise"): ("finding", "<", 0.5),
        (structure, "max_write_relative_error"): ("check", "<=", 1e-4),
        (structure, "cache_mismatched_layers"): ("check", "==", 0),
    }
    for (pair, metric), (kind, op, value) in expected.items():
        crit = rows[pair].criteria[metric]
        assert (crit.kind, crit.threshold.op, crit.threshold.value) == (kind, op, value), metric
        assert "issue 20" in crit.source and crit.amended_from is None and not crit.after_observation
    assert all(c.suite == "real" for c in rows.values())
    assert not any(c.task.startswith("real_") for c in REGISTRY if c.suite == "default")


def test_the_committed_real_page_matches_the_registry():
    assert load_catalog(suite="real") == []
    doc = Path(__file__).resolve().parents[2] / "docs" / "bench-rows-real.md"
    assert doc.read_text(encoding="utf-8") == rows_markdown(REGISTRY, "real"), \
        "docs/bench-rows-real.md is out of date: run `mechscope bench --suite real --list > docs/bench-rows-real.md`"


def test_frequent_ids_counts_ranks_and_leaves_out_special_tokens():
    from mechscope.bench.real_data import frequent_ids

    tokens = [5, 5, 5, 2, 2, 9, 9, 1, 1, 1, 1, 7]
    assert frequent_ids(tokens, 3, exclude=[1]) == [5, 2, 9]  # 1 is special; 2 and 9 tie: lower id first
    with pytest.raises(ValueError, match="only 4 distinct tokens"):
        frequent_ids(tokens, 10, exclude=[1])
