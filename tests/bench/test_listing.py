"""docs/bench-rows.md is the registry's own list of rows, kinds, criteria and sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mechscope.bench import amended
from mechscope.bench.catalog import load_catalog
from mechscope.bench.listing import rows_markdown
from mechscope.bench.registry import REGISTRY, Registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "bench-rows.md"


def test_the_committed_page_matches_the_registry():
    assert load_catalog() == []
    assert DOC.read_text(encoding="utf-8") == rows_markdown(REGISTRY), \
        "docs/bench-rows.md is out of date: run `mechscope bench --list > docs/bench-rows.md`"


def test_every_metric_is_one_line_with_its_kind_and_amendment():
    reg = Registry()
    reg.register("t", "m", "x", (">=", 0.9), kind="finding", source="a | b", run=lambda ctx: 0,
                 amended_from=amended(None, "no criterion before", "2026-12-06"), after_observation=True,
                 other_metrics={"y": None})
    page = rows_markdown(reg)
    assert "| t | m | x | finding | >= 0.9 (amended 2026-12-06 from none) | yes |  | a \\| b |" in page
    assert "| t | m | y | info | — |  |  |  |" in page and "0 checks, 1 finding, 1 info" in page


def test_the_command_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "mechscope", "bench", "--list"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("# Bench rows")


INFO_BY_RULE = {
    "core/hooks",  # timings are info by the rule; their targets live in benchmarks/
    "synthetic_features/topk_untied",  # tied vs untied: info unless a spec states a published contrast (none does)
}


def test_no_registered_method_row_is_without_a_criterion():
    assert load_catalog() == []
    bare = [f"{c.task}/{c.method}" for c in REGISTRY
            if all(crit.kind == "info" for crit in c.criteria.values()) and f"{c.task}/{c.method}" not in INFO_BY_RULE]
    assert not bare, f"rows with no criterion at all: {bare}"


def test_the_real_suite_page_matches_its_registry():
    assert load_catalog(suite="real") == []  # importing the suite needs no model package
    page = DOC.with_name("bench-rows-real.md").read_text(encoding="utf-8")
    assert page == rows_markdown(REGISTRY, "real"), \
        "docs/bench-rows-real.md is out of date: run `mechscope bench --suite real --list > docs/bench-rows-real.md`"
    assert all(c.suite == "real" for c in REGISTRY if c.task.startswith("real_"))
