"""The RAVEL rows: registered before they ran, info rows per featurizer and three findings, each
judged on a paired interval; a contrast row is built from two results on the same pairs."""

import torch

from mechscope.bench import REGISTRY
from mechscope.bench.catalog import CHECK_MODULES, load_catalog
from mechscope.bench.ravel_checks import (
    ORDER,
    RAVEL_METHODS,
    _contrast_row,
    _mdas_margin,
)
from mechscope.causal.disentangle import DisentangleResult, Score


def _checks():
    assert "mechscope.bench.ravel_checks" in CHECK_MODULES
    assert not load_catalog(["mechscope.bench.ravel_checks"])
    return {c.name: c for c in REGISTRY if c.task == "ravel"}


def test_every_featurizer_has_an_info_row_and_the_findings_are_registered():
    checks = _checks()
    for name in ORDER:
        c = checks[f"ravel/{name}/disentangle"]
        assert c.kind == "info" and {"cause", "isolate"} <= set(c.criteria)
    findings = {("multitask_das", "margin_over_best_other"), ("sae", "das_minus_disentangle"),
                ("interventional", "minus_sae_disentangle")}
    for method, metric in findings:
        crit = checks[f"ravel/{method}/disentangle"].criteria[metric]
        assert crit.kind == "finding" and str(crit.threshold) == "> 0" and crit.source
        assert not crit.after_observation and crit.amended_from is None
    assert "interventional" not in RAVEL_METHODS and "multitask_das" not in RAVEL_METHODS
    for method in ("neurons", "pca", "das", "dbm"):  # RAVEL's ordering per featurizer, written after the first run
        crit = checks[f"ravel/{method}/disentangle"].criteria["mdas_minus_disentangle"]
        assert crit.kind == "finding" and crit.after_observation and crit.amended_from is not None


def _result(cause: list[int], isolate: list[int]) -> DisentangleResult:
    c, i = torch.tensor(cause, dtype=torch.bool), torch.tensor(isolate, dtype=torch.bool)
    s = lambda h: Score(float(h.double().mean()), (0.0, 1.0), h.numel())  # noqa: E731
    both = Score(0.5 * (s(c).value + s(i).value), (0.0, 1.0), c.numel() + i.numel())
    return DisentangleResult(s(c), s(i), both, {"a": s(c)}, {("a", "b"): s(i)}, {"a": c}, {("a", "b"): i})


def test_the_margin_is_held_against_the_best_other_featurizer():
    good = _result([1, 1, 1, 1], [1, 1, 1, 1])
    others = {n: _result([0, 0, 1, 1], [1, 1, 1, 1]) for n in RAVEL_METHODS}
    others["das"] = _result([1, 1, 1, 0], [1, 1, 1, 1])
    [row] = _mdas_margin({"results": {"multitask_das": good, **others}, "setting": "test"})
    assert row.detail["best_other"] == "das" and row.value == 0.125 and row.metric == "margin_over_best_other"
    assert row.interval[0] <= row.value <= row.interval[1]
    same = _contrast_row({"results": {"x": good, "y": good}, "setting": "test"}, "x", "y", "m")
    assert same.value == 0.0 and same.interval == (0.0, 0.0)
