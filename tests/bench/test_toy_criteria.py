"""The TMS and grokking criteria fail on their recorded untrained baselines (issue 18).

The baseline values below were measured on 2026-12-06 by
``python -m mechscope bench --only tms,grokking/fourier --out /tmp/toy-after --no-report
--no-fail --threads 1`` (seed 0), read from the rows' ``baselines.untrained`` in the
scoreboard; they are constants here, not a rerun.
"""

import math

import pytest
import torch

from mechscope.bench import REGISTRY, toy_checks
from mechscope.bench.catalog import load_catalog
from mechscope.core.stats import wilson_interval
from mechscope.tasks import tms

# (task, method, metric) -> untrained value at seed 0, 2026-12-06 (command in the docstring)
UNTRAINED = {
    ("tms", "superposition", "dense_dstar_abs_error"): 0.4266176904952298,
    ("tms", "superposition", "dense_represented_features"): 3,
    ("tms", "superposition", "sparse_represented_gain"): 0,  # the initialisation against itself
    ("tms", "superposition", "sparse_dimensions_per_feature"): 1.0509898206551225,
    ("tms", "superposition", "feature_dimensionality_near_fractions_tight"): 0.03333333333333333,
    ("grokking", "fourier", "test_accuracy"): 0.00827925710449765,
    ("grokking", "fourier", "key_frequencies_agreeing"): 0,
    ("grokking", "fourier", "key_frequencies_agreed_share"): 0.0,
    ("grokking", "fourier", "restricted_accuracy"): 0.008849557522123894,
    ("grokking", "fourier", "excluded_loss_train"): 4.760755887355598,
    ("grokking", "fourier", "phases_in_order"): 0,
}
N = {("grokking", "fourier", "test_accuracy"): 8938, ("grokking", "fourier", "restricted_accuracy"): 113 * 113}
# rows amended to info because the untrained baseline met them: (value, original criterion)
AMENDED_TO_INFO = {
    ("tms", "superposition", "sparse_represented_features"): 5,  # untrained, seed 1 (seed 0 has 2)
    ("tms", "superposition", "feature_dimensionality_near_fractions"): 0.5666666666666667,
    ("grokking", "fourier", "key_frequencies_union"): 6,
    ("grokking", "fourier", "restricted_over_test_loss"): 0.9999189100930606,
}
# the trained values of the same run, which the criteria must still accept
TRAINED = {
    ("tms", "superposition", "sparse_represented_gain"): 3,
    ("grokking", "fourier", "key_frequencies_agreed_share"): 4 / 6,
    ("grokking", "fourier", "restricted_accuracy"): 1.0,
    ("grokking", "fourier", "excluded_loss_train"): 6.443956258325146,
    ("grokking", "fourier", "phases_in_order"): 3,
}


def criterion(task, method, metric):
    load_catalog()
    return next(c.criteria[metric] for c in REGISTRY if (c.task, c.method) == (task, method) and metric in c.criteria)


@pytest.mark.parametrize("key", sorted(UNTRAINED))
def test_every_finding_fails_on_its_untrained_baseline(key):
    crit = criterion(*key)
    assert crit.kind == "finding"
    assert crit.verdict(UNTRAINED[key]) is False
    if key in N:  # with its Wilson interval, too
        assert crit.verdict(UNTRAINED[key], wilson_interval(UNTRAINED[key], N[key])) is False


@pytest.mark.parametrize("key", sorted(AMENDED_TO_INFO))
def test_rows_met_by_untrained_weights_are_info_and_keep_their_original(key):
    crit = criterion(*key)
    assert crit.kind == "info" and crit.verdict(AMENDED_TO_INFO[key]) is None
    original = crit.amended_from.original
    assert original is not None and original.passes(AMENDED_TO_INFO[key])  # why it was amended


@pytest.mark.parametrize("key", sorted(TRAINED))
def test_amended_and_new_criteria_accept_the_trained_values(key):
    crit = criterion(*key)
    assert crit.verdict(TRAINED[key]) is True and crit.after_observation
    assert crit.amended_from is not None and crit.amended_from.date == "2026-12-06"


def test_excluded_loss_amendment_keeps_the_original_and_sits_above_chance():
    crit = criterion("grokking", "fourier", "excluded_loss_train")
    assert crit.amended_from.original.op == ">" and crit.amended_from.original.value == 1.0
    assert crit.threshold.value == pytest.approx(math.log(113) + 1.0)
    assert not crit.verdict(math.log(113) + 0.5)  # "worse than chance" needs the margin


def test_every_tms_and_grokking_row_declares_the_untrained_baseline():
    load_catalog()
    for key in (("tms", "superposition"), ("grokking", "fourier")):
        check = next(c for c in REGISTRY if (c.task, c.method) == key)
        assert "untrained" in check.baselines


def test_batched_tms_measures_equal_the_single_ones():
    cfg = tms.intro_config(seed=3)
    W = tms.initial_model(cfg).W.detach()
    one = toy_checks.tms_measures(W)
    both = toy_checks.tms_measure_draws(torch.stack([W, W.flip(0)]))
    for name, value in one.items():
        assert both[name][0].item() == pytest.approx(value)
    assert one["sparse_represented_features"] == toy_checks.tms_measures(W.flip(0))["dense_represented_features"]


def test_untrained_pass_rates_show_which_criteria_untrained_weights_meet():
    rates = toy_checks.untrained_pass_rates(tms.intro_config(), draws=2000)
    assert rates["sparse_represented_features"] > 0.6 and rates["feature_dimensionality_near_fractions"] > 0.5
    assert rates["feature_dimensionality_near_fractions_tight"] < 0.02 and rates["dense_dstar_abs_error"] < 0.1
    assert set(rates) == set(toy_checks.TMS_CRITERIA)
