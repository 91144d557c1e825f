"""Direction methods by name and the measured effect of using a direction (what ``mechscope steer`` reports)."""

import pytest
import torch

from mechscope.steer import directions as d
from mechscope.steer.effects import next_token_effect
from mechscope.probe.linear import probe_direction


def test_find_direction_dispatches_to_each_method():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 8, generator=g) + 2.0, torch.randn(30, 8, generator=g)
    assert torch.equal(d.find_direction("diff_of_means", a, b), d.diff_of_means(a, b))
    assert torch.equal(d.find_direction("actadd", a, b), d.actadd(a[0], b[0]))
    pca = d.find_direction("pca", a, b, seed=3)
    assert torch.equal(pca, d.pca_of_differences(a[:30], b[:30], seed=3) * float((a.mean(0) - b.mean(0)).norm()))
    probe = d.find_direction("probe", a, b, probe_fit=probe_direction)
    assert d.cosine(probe, d.diff_of_means(a, b)) > 0.8
    with pytest.raises(d.DirectionError, match="probe_fit="):  # probes are a sibling method: the caller brings one
        d.find_direction("probe", a, b)
    with pytest.raises(d.DirectionError, match="unknown direction method 'nope'; choose from diff_of_means"):
        d.find_direction("nope", a, b)


def test_next_token_effect_is_kl_and_target_probability_over_real_positions():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    same = next_token_effect(logits, logits.clone(), logits[..., 0].long(), target=2)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["p_target_before"] == same["p_target_after"]
    changed = logits.clone()
    changed[..., 2] += 5.0
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0  # padding after position 2 of the first example
    out = next_token_effect(logits, changed, {"input_ids": mask, "attention_mask": mask}, target=2)
    assert out["kl"] > 0 and out["p_target_after"] > out["p_target_before"]
    p = logits.log_softmax(-1)
    assert out["p_target_before"] == pytest.approx(float(torch.stack([p[0, 2, 2], p[1, 4, 2], p[2, 4, 2]]).exp().mean()))
