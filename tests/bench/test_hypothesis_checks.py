"""The hypothesis rows (issue 21): they run, give their verdicts, and their criteria are not vacuous."""

import json

from mechscope.bench import REGISTRY
from mechscope.bench.catalog import load_catalog
from mechscope.cli import main

ONLY = "rival_variables,induction/causal_scrubbing,hierarchical_equality/causal_scrubbing"


def criterion(task, method, metric):
    load_catalog()
    return next(c.criteria[metric] for c in REGISTRY if (c.task, c.method) == (task, method) and metric in c.criteria)


def test_the_rows_run_and_pass(tmp_path, capsys):
    assert main(["bench", "--only", ONLY, "--out", str(tmp_path), "--no-report", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "scoreboard.json").read_text())["rows"]
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["metric"]), []).append(r)
    assert [r["passed"] for r in by["rival_variables", "iia_difference_ci_low"]] == [True, True]
    assert by["rival_variables", "iia_difference_mixed_layer"][0]["detail"]["winner"] == "neither"
    (k,), (q,) = by["induction", "loss_recovered"], by["induction", "wrong_hypothesis_loss_recovered"]
    assert k["kind"] == q["kind"] == "finding" and k["detail"]["hypothesis"] == "k_composition"
    assert k["value"] > 0.8 > 0.5 > q["value"]
    assert len(by["hierarchical_equality", "loss_recovered"]) == 3
    (gap,) = by["hierarchical_equality", "claim_minus_best_half"]
    assert gap["kind"] == "check" and gap["passed"] and gap["detail"]["best_half"] == "wx_only"
    drawn = tmp_path / "figures"
    if drawn.exists():  # without matplotlib no figure is drawn (the report notes it)
        assert {"induction__causal_scrubbing__scrubbing_recovery.png",
                "rival_variables__compare__iia_per_variable.png"} <= {f.name for f in drawn.iterdir()}


def test_the_criteria_fail_on_the_other_hypothesis():
    right = criterion("induction", "causal_scrubbing", "loss_recovered")
    wrong = criterion("induction", "causal_scrubbing", "wrong_hypothesis_loss_recovered")
    assert right.kind == wrong.kind == "finding" and "Chan et al. 2022" in right.source
    # the wrong hypothesis's measured value would not pass the right one's criterion, nor the reverse
    assert right.verdict(0.236, (0.211, 0.259)) is False and wrong.verdict(0.988, (0.985, 0.990)) is False
    assert right.verdict(0.85, (0.78, 0.9)) is False  # the whole interval must clear 0.8
    rival = criterion("rival_variables", "compare", "iia_difference_ci_low")
    assert rival.kind == "check" and rival.verdict(0.0) is False
