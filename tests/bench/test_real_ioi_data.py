"""The IOI row's pure helpers (no model, so these run in CI): the templated prompts and their
corrupted counterparts, the layout check, the S2 -> final shift score, the top-10 % share,
the correlation; and the row's pre-registered criteria, which must not drift from issue 20."""

import pytest
import torch

from mechscope.bench.catalog import load_catalog
from mechscope.bench.real_ioi_data import (
    FINAL_POS,
    N_TOKENS,
    NAMES,
    S2_POS,
    check_layout,
    effects_from,
    final_share,
    ioi_prompts,
    pearson,
    shift_score,
    top_count,
    top_share,
)
from mechscope.bench.registry import REGISTRY


def _words(text: str) -> list[str]:
    return text.replace(",", " ,").split()


def test_prompts_are_distinct_balanced_and_swap_the_repeated_name_only():
    prompts = ioi_prompts(256, seed=0)
    assert len({p.clean for p in prompts}) == 256
    assert sum(p.order == "ABB" for p in prompts) == 128
    for p in prompts:
        clean, corrupt = _words(p.clean), _words(p.corrupt)
        assert len(clean) == len(corrupt) == N_TOKENS - 1  # one word per slot; BOS comes from the tokenizer
        assert [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b] == [S2_POS - 1]
        assert clean[S2_POS - 1] == p.s and corrupt[S2_POS - 1] == p.io and p.io != p.s
        first, second = clean[1], clean[3]
        assert (first, second) == ((p.io, p.s) if p.order == "ABB" else (p.s, p.io))
    assert ioi_prompts(10, seed=3) == ioi_prompts(10, seed=3)
    assert ioi_prompts(10, seed=3) != ioi_prompts(10, seed=4)


def test_check_layout_refuses_wrong_lengths_and_misplaced_names():
    prompts = ioi_prompts(4, seed=0)
    name_id = {n: 1000 + i for i, n in enumerate(NAMES)}
    ids = torch.zeros(4, N_TOKENS, dtype=torch.long)
    for i, p in enumerate(prompts):
        io_pos = 2 if p.order == "ABB" else 4
        ids[i, io_pos], ids[i, 6 - io_pos], ids[i, S2_POS] = name_id[p.io], name_id[p.s], name_id[p.s]
    check_layout(ids, prompts, name_id)
    with pytest.raises(ValueError, match="15 tokens"):
        check_layout(ids[:, :-1], prompts, name_id)
    ids[1, S2_POS] = 7
    with pytest.raises(ValueError, match="prompt 1"):
        check_layout(ids, prompts, name_id)


def test_shift_score_is_takeover_minus_s2_peak():
    eff = torch.zeros(6, N_TOKENS)
    eff[:, S2_POS] = torch.tensor([1.0, 1.0, 1.2, 0.6, 0.1, 0.0])
    eff[:, FINAL_POS] = torch.tensor([0.0, 0.0, 0.1, 0.5, 0.9, 1.0])
    score, takeover, peak = shift_score(eff, S2_POS, FINAL_POS)
    assert (score, takeover, peak) == (2, 4, 2)  # at layer 3 the share is 0.5 / 1.1, not above 0.5
    assert final_share(eff, FINAL_POS)[4] == pytest.approx(0.9)
    eff[:, FINAL_POS] = 0.0
    assert shift_score(eff, S2_POS, FINAL_POS) == (-6, None, 2)
    # the signs do not matter, and ties in the S2 peak go to the first layer
    flat = torch.zeros(3, N_TOKENS)
    flat[:, S2_POS], flat[:, FINAL_POS] = 1.0, torch.tensor([0.0, 0.0, -3.0])
    assert shift_score(flat, S2_POS, FINAL_POS) == (2, 2, 0)


def test_top_share_counts_the_top_tenth_rounded_down():
    assert top_count(72) == 7 and top_count(5) == 1 and top_count(100) == 10
    eff = torch.zeros(72)
    eff[:7] = torch.tensor([3.0, -2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    eff[7:] = 0.1
    assert top_share(eff) == pytest.approx(10.0 / (10.0 + 6.5))
    assert top_share(torch.zeros(10)) == 0.0
    assert top_share(torch.ones(10)) == pytest.approx(0.1)


def test_pearson_and_effects_from_prompt_means():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert pearson(x, torch.ones(4)) == 0.0
    with pytest.raises(ValueError):
        pearson(x, x[:3])
    values = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # [prompts, cells]
    clean, corrupt = torch.tensor([4.0, 6.0]), torch.tensor([0.0, 2.0])
    assert effects_from(values, clean, corrupt).tolist() == pytest.approx([0.25, 0.75])


def test_ioi_criteria_are_issue_20s():
    load_catalog(suite="real")
    rows = {(c.task, c.method, c.metric): c for c in REGISTRY if c.task == "real_ioi"}
    assert all(c.suite == "real" for c in rows.values())
    acc = rows[("real_ioi", "logit_difference", "io_preferred_accuracy")]
    assert acc.kind == "finding" and str(acc.threshold) == ">= 0.8"
    assert str(rows[("real_ioi", "residual_patching", "final_takeover_after_s2_peak_layers")].threshold) == ">= 1"
    heads = rows[("real_ioi", "head_patching", "top10pct_head_share")]
    assert str(heads.threshold) == ">= 0.5"
    assert str(heads.criteria["head_pearson"].threshold) == ">= 0.7" and heads.criteria["head_pearson"].kind == "finding"
    assert heads.criteria["resid_pearson"].kind == "info"
    assert all(c.criteria[m].source for c in rows.values() for m in c.criteria
               if c.criteria[m].kind != "info" or m == "resid_pearson")
