"""The steering, instructions, planted-probe, Othello, core and SPD criteria fail on their
recorded untrained / random baselines (issue 18).

The baseline values below were measured on 2026-12-06 (seed 0) by
``python -m mechscope bench --only steering_toy,planted --out /tmp/h6/out1 --no-report --no-fail --threads 1``,
``... --only tms_5_2_id,resid_mlp --out /tmp/h6/out2``, ``... --only core --out /tmp/h6/out3`` and
``... --only othello,instructions --out /tmp/h6/out4``, read from the rows' ``baselines`` in the
scoreboards (the TMS SPD rows from the scoreboard of 2026-12-06 before this change, whose
values they did not change); they are constants here, not a rerun.
"""

import math

import pytest
import torch

from mechscope.bench import REGISTRY
from mechscope.bench.catalog import load_catalog
from mechscope.core.stats import newcombe_interval
from mechscope.bench.core_checks import _RandomBasis, featurizer_errors
from mechscope.core.featurize import PCA, Rotation, Subspace
from mechscope.core.stats import wilson_interval
from mechscope.tasks import steering_toy as st

# (task, method, metric) -> (baseline name, its value), 2026-12-06 (commands in the docstring)
BASELINES = {
    ("steering_toy", "diff_of_means", "cosine_to_concept"): ("untrained_model", 0.9350821534161049),
    ("steering_toy", "directional_ablation", "r_rate_excess"): ("random_direction", 1.0),
    ("steering_toy", "directional_ablation", "r_removed_rate"): ("untrained_model", 0.0),
    ("steering_toy", "addition", "r_rate_induced"): ("untrained_model", 0.0),
    ("steering_toy", "weight_orthogonalization", "max_abs_diff"): ("unedited", 8.952017784118652),
    ("instructions", "loreft", "accuracy"): ("no_intervention", 0.02666666666666667),
    ("instructions", "loreft", "lora_accuracy"): ("no_intervention", 0.02666666666666667),
    ("planted", "sparse_probe", "support_overlap"): ("random_neurons", 0.0),
    ("planted", "sparse_probe", "f1_shift_spearman"): ("random_neurons", 0.3142857142857143),
    ("planted", "linear_probe", "control_excess"): ("memorising_activations", 0.39),
    ("planted", "linear_probe", "task_excess"): ("shuffled_labels", -0.007500000000000007),
    ("planted", "mdl_probe", "compression"): ("shuffled_labels", 0.9910551371534791),
    ("othello", "linear_probe", "relative_minus_absolute"): ("untrained_model", 0.029542824074074048),
    ("othello", "probe_edit", "success_rate"): ("random_direction", 0.17666666666666667),
    ("core", "featurizers", "max_orthonormality_error"): ("random_basis", 0.3980570384950657),
    ("core", "featurizers", "max_feature_round_trip_error"): ("random_basis", 0.5621900486143538),
    ("tms_5_2", "spd", "live_encoder"): ("initial_decomposition", 18.0),
    ("tms_5_2", "spd", "mmcs"): ("initial_decomposition", 0.8042425940993067),
    ("tms_5_2", "spd", "ml2r_abs_error"): ("initial_decomposition", 0.7787076751475276),
    ("tms_5_2", "spd", "ci_violations"): ("initial_decomposition", 21.0),
    ("tms_5_2", "spd", "ci_diag_min"): ("initial_decomposition", 0.31018897891044617),
    ("tms_5_2", "spd", "ci_offdiag_max"): ("initial_decomposition", 0.4351522922515869),
    ("tms_40_10", "spd", "live_encoder"): ("initial_decomposition", 200.0),
    ("tms_40_10", "spd", "mmcs"): ("initial_decomposition", 0.2684119703338701),
    ("tms_40_10", "spd", "ci_violations"): ("initial_decomposition", 518.0),
    ("tms_5_2_id", "spd", "identity_live"): ("initial_decomposition", 18.0),
    ("tms_5_2_id", "spd", "identity_importance_min"): ("initial_decomposition", 0.0),
    ("resid_mlp", "spd", "w_in_ci_alive"): ("initial_decomposition", 48.0),
    ("resid_mlp", "spd", "w_in_violations"): ("initial_decomposition", 536.0),
    ("resid_mlp", "spd_surgery", "lost_fraction"): ("initial_decomposition", 0.005933574322887882),
}
# amended criteria: (the baseline that passed the original criterion, the original as (op, value))
AMENDED = {
    ("steering_toy", "diff_of_means", "cosine_to_concept"): (0.9350821534161049, (">", 0.9)),
    ("resid_mlp", "spd", "w_in_live"): (100.0, ("==", 100)),
    ("core", "featurizers", "max_round_trip_error"): (4.76837158203125e-07, ("<=", 1e-5)),
    ("instructions", "loreft", "lora_param_ratio"): (17.86046511627907, (">=", 10.0)),
}
# side-effect bounds that a model doing nothing also meets; each is paired with an effect row
# that fails on the same baseline (the pair is the finding)
NO_OP_PASSES = {
    ("steering_toy", "directional_ablation", "r_rate_excess"): (0.0, "r_removed_rate"),
    ("steering_toy", "directional_ablation", "kl_unrelated"): (0.004925404209643602, "r_removed_rate"),
    ("resid_mlp", "spd_surgery", "others_error_change"): (0.03223884105682373, "lost_fraction"),
    ("instructions", "loreft", "accuracy_gap_to_lora"): (0.0, "accuracy"),
}
# trained values of the same runs, which the criteria must still accept
TRAINED = {
    ("steering_toy", "diff_of_means", "cosine_to_concept"): 0.9997394910785253,
    ("resid_mlp", "spd", "w_in_ci_alive"): 100.0,
    ("core", "featurizers", "max_orthonormality_error"): 3.869357565466913e-07,
    ("core", "featurizers", "max_feature_round_trip_error"): 5.899551758303694e-07,
    ("othello", "linear_probe", "relative_minus_absolute"): 0.1830729166666667,
}


def criterion(task, method, metric):
    load_catalog()
    return next(c.criteria[metric] for c in REGISTRY if (c.task, c.method) == (task, method) and metric in c.criteria)


@pytest.mark.parametrize("key", sorted(BASELINES))
def test_every_criterion_fails_on_its_baseline(key):
    crit = criterion(*key)
    assert crit.kind in ("check", "finding")
    assert crit.verdict(BASELINES[key][1]) is False, (key, BASELINES[key])


@pytest.mark.parametrize("key", sorted(AMENDED))
def test_amended_criteria_keep_the_original_that_the_baseline_passed(key):
    crit = criterion(*key)
    value, (op, original) = AMENDED[key]
    assert crit.amended_from is not None and crit.amended_from.date == "2026-12-06"
    assert (crit.amended_from.original.op, crit.amended_from.original.value) == (op, original)
    assert crit.amended_from.original.passes(value)  # why it was amended
    assert crit.verdict(value) in (False, None)  # now it fails, or is information


@pytest.mark.parametrize("key", sorted(NO_OP_PASSES))
def test_bounds_a_no_op_meets_come_with_an_effect_row_it_fails(key):
    value, effect = NO_OP_PASSES[key]
    assert criterion(*key).verdict(value) is True
    task, method, _ = key
    assert criterion(task, method, effect).verdict(BASELINES[(task, method, effect)][1]) is False


@pytest.mark.parametrize("key", sorted(TRAINED))
def test_trained_values_still_pass(key):
    assert criterion(*key).verdict(TRAINED[key]) is True


def test_the_cosine_criterion_fails_on_every_untrained_model_measured():
    # the highest of 40 untrained models (steering_toy.build_model(seed) for seeds 1-40, scored with the
    # row's samples at 600 per class on 2026-12-06; docs/results.md) and the top of the range
    crit = criterion("steering_toy", "diff_of_means", "cosine_to_concept")
    assert crit.verdict(0.9704782366752625) is False and crit.verdict(0.98) is False


def test_new_criteria_say_why_and_when():
    for key in [("steering_toy", "directional_ablation", "r_removed_rate"), ("instructions", "loreft", "accuracy"),
                ("instructions", "loreft", "lora_accuracy"), ("resid_mlp", "spd", "w_in_ci_alive"),
                ("core", "featurizers", "max_orthonormality_error")]:
        crit = criterion(*key)
        assert crit.amended_from is not None and crit.amended_from.original is None and crit.source, key


def test_info_rows_and_known_cause():
    assert criterion("resid_mlp", "spd", "w_in_live").kind == "info"
    assert criterion("instructions", "loreft", "lora_param_ratio").kind == "info"
    assert criterion("core", "featurizers", "max_round_trip_error").kind == "info"
    cause = criterion("tms_5_2_id", "spd", "identity_importance_min").known_cause
    assert "orthogonal" in cause and "docs/results.md" in cause


def test_accuracy_findings_need_their_interval_to_clear():
    crit = criterion("othello", "probe_edit", "success_rate")
    # the recorded 256 / 300 edits: Wilson's lower end 0.809 clears 0.8; at 245 / 300 (0.817) it does not
    assert crit.verdict(256 / 300, wilson_interval(256 / 300, 300)) is True
    assert crit.verdict(245 / 300, wilson_interval(245 / 300, 300)) is False


def test_newcombe_interval():
    lo, hi = newcombe_interval(0.8, 300, 0.6, 300)
    assert lo < 0.2 < hi and 0.1 < lo and hi < 0.3
    lo, hi = newcombe_interval(1.0, 300, 299 / 300, 300)
    assert lo < 1 / 300 < hi <= 0.02  # the recorded LoRA - LoReFT gap, [-0.0096, 0.0186]
    # wider than each proportion's own interval, and symmetric when the proportions are swapped
    a, b = newcombe_interval(0.3, 50, 0.5, 80), newcombe_interval(0.5, 80, 0.3, 50)
    assert math.isclose(a[0], -b[1]) and math.isclose(a[1], -b[0])


def test_featurizer_errors_tell_an_orthonormal_basis_from_any_other():
    acts = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for f in (Subspace(16, 4, seed=0), Rotation(16, seed=0), PCA.fit(acts, k=6)):
        e = featurizer_errors(f, acts)
        assert max(e.values()) < 1e-5, (f, e)
    bad = featurizer_errors(_RandomBasis(16, 4, seed=0), acts)
    assert bad["round_trip"] < 1e-5  # the old criterion: exact by algebra for any basis
    assert bad["orthonormality"] > 0.1 and bad["feature_round_trip"] > 0.1


def test_per_input_measures_agree_with_the_means():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, st.LENGTH + 2, st.VOCAB, generator=gen), torch.randn(5, st.LENGTH + 2, st.VOCAB, generator=gen)
    assert math.isclose(st.content_kl(a, b), float(st.content_kl_per_input(a, b).mean()), rel_tol=1e-6)
    assert st.r_rate(a)["argmax_r"] == float(st.emits_r(a).double().mean())
