import json

import pytest

from mechscope.report.scoreboard import ScoreboardError, load_scoreboard
from mechscope.report.html import render_report, write_report

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 8


def row(task, method, metric, value, threshold, passed, **extra):
    return {"task": task, "method": method, "metric": metric, "value": value, "threshold": threshold,
            "passed": passed, "baselines": extra.pop("baselines", {}), "seconds": 1.25,
            "detail": extra.pop("detail", {}), **extra}


def board():
    return {
        "schema": 1, "mechscope": "0.1.0", "torch": "2.13.0", "device": "cpu", "seed": 0,
        "started": "2026-11-24T10:00:00Z", "seconds": 12.5, "threads": 1, "complete": True,
        "rows": [
            row("hier_eq", "das", "iia", 0.991, {"op": ">=", "value": 0.95}, True,
                baselines={"random_subspace": 0.52, "best_neurons": 0.63}, detail={"layer": 1, "variable": "WX"}),
            row("hier_eq", "probe", "accuracy", 0.4, {"op": ">=", "value": 0.9}, False),
            row("toy<b>", "sae", "mse", None, {"op": "<=", "value": 0.1}, False, error="ValueError: bad <input>"),
            row("toy<b>", "sae", "l0", 12, None, None),
        ],
        "figures": [
            {"task": "hier_eq", "method": "das", "name": "iia", "caption": "IIA per layer",
             "path": "figures/hier_eq__das__iia.png"},
            {"task": "toy<b>", "method": "sae", "name": "geom", "caption": "", "missing": "matplotlib is not installed"},
            {"task": "toy<b>", "method": "sae", "name": "gone", "caption": "", "path": "figures/gone.png"},
        ],
    }


@pytest.fixture
def out(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "hier_eq__das__iia.png").write_bytes(PNG)
    return tmp_path


def test_summary_table_and_criteria(out):
    html = render_report(board(), out)
    assert html.startswith("<!DOCTYPE html>") and "<h2>Summary</h2>" in html
    assert "<b>checks 1/2 · findings 0/0 reproduced · 1 for information · 1 raised</b>" in html
    assert '<tr class="pass"><td><a href="#task-hier_eq">hier_eq</a></td><td>das</td><td>iia</td>' \
           '<td class="kind">check</td><td class="num">0.991</td><td class="num">≥ 0.95</td>' \
           '<td class="verdict">PASS</td><td>random_subspace 0.52, best_neurons 0.63</td>' in html
    assert '<td class="num">0.4</td><td class="num">≥ 0.9</td><td class="verdict">FAIL</td>' in html
    assert "Failed checks and rows that raised:" in html
    assert '<td class="verdict">ERROR</td>' in html and "none (reported for information)" in html
    assert 'class="detail">layer=1, variable=WX</td>' in html


def test_sections_figures_and_notes(out):
    html = render_report(board(), out)
    assert '<h2 id="task-hier_eq">hier_eq</h2><figure><img alt="IIA per layer" src="data:image/png;base64,' in html
    assert "Figure geom: matplotlib is not installed" in html
    assert "Figure gone: file" in html and "not found" in html


def test_everything_is_escaped(out):
    html = render_report(board(), out)
    assert "toy<b>" not in html and "toy&lt;b&gt;" in html
    assert "bad &lt;input&gt;" in html


def test_incomplete_run_banner(out):
    html = render_report({**board(), "complete": False}, out)
    assert "This run did not finish" in html


def test_write_report_and_load_round_trip(out):
    (out / "scoreboard.json").write_text(json.dumps(board()))
    path = write_report(load_scoreboard(out / "scoreboard.json"), out)
    assert path == out / "report.html" and "data:image/png;base64," in path.read_text()


def test_load_scoreboard_errors(tmp_path):
    with pytest.raises(ScoreboardError, match="no scoreboard at"):
        load_scoreboard(tmp_path / "missing.json")
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(ScoreboardError, match="not valid JSON"):
        load_scoreboard(bad)
    bad.write_text(json.dumps({**board(), "schema": 3}))
    with pytest.raises(ScoreboardError, match="schema 3; this mechscope reads schema 1 or 2"):
        load_scoreboard(bad)
    b = board()
    del b["rows"][0]["passed"]
    bad.write_text(json.dumps(b))
    with pytest.raises(ScoreboardError, match="row 0 lacks key"):
        load_scoreboard(bad)


@pytest.mark.parametrize("ref", ["../secret.png", "/etc/hostname", "figures/link.png"])
def test_figure_paths_outside_the_scoreboard_directory_are_refused(tmp_path, ref):
    out = tmp_path / "bench"
    (out / "figures").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(PNG)
    (out / "figures" / "link.png").symlink_to(tmp_path / "secret.png")
    b = board()
    b["figures"][0]["path"] = ref
    (out / "scoreboard.json").write_text(json.dumps(b))
    with pytest.raises(ScoreboardError, match=rf"figure 0 \(iia\): the path '{ref}' (is absolute|leads outside)"):
        load_scoreboard(out / "scoreboard.json")
    with pytest.raises(ValueError, match="leads outside|is absolute"):
        render_report(b, out)  # a board handed over in Python is checked too: nothing outside is embedded


def test_figure_entries_must_be_objects(tmp_path):
    b = board()
    b["figures"].append("figures/hier_eq__das__iia.png")
    (tmp_path / "scoreboard.json").write_text(json.dumps(b))
    with pytest.raises(ScoreboardError, match="figure 3 must be an object with string task, method and name"):
        load_scoreboard(tmp_path / "scoreboard.json")
    b["figures"] = {"a": 1}
    (tmp_path / "scoreboard.json").write_text(json.dumps(b))
    with pytest.raises(ScoreboardError, match="'figures' must be a list, got dict"):
        load_scoreboard(tmp_path / "scoreboard.json")


def _finding(value, passed, **extra):
    return row("hier_eq", "das", "iia", value, {"op": ">=", "value": 0.95}, passed, kind="finding", **extra)


def test_findings_table_on_the_first_screen_with_intervals_and_known_causes(out):
    rows = [_finding(0.93, False, detail={"variable": "WX", "n": 2000, "ci95": [0.918, 0.94]},
                     known_cause="pyvene reaches 0.944 on the same recipe", source="causal_abstraction.md"),
            _finding(0.97, True, detail={"variable": "YZ", "n": 2000, "ci95": [0.962, 0.977]}),
            row("core", "patching", "max_abs_diff", 0.0, {"op": "<=", "value": 1e-5}, True, kind="check")]
    html = render_report({**board(), "schema": 2, "rows": rows}, out)
    assert "checks 1/1 · findings 1/2 reproduced · 0 for information" in html
    findings = html[html.index("<h2>Findings</h2>"):html.index("<h2>Summary</h2>")]
    assert findings.index("variable=WX") < findings.index("variable=YZ")  # not reproduced first
    assert "not reproduced" in findings and "pyvene reaches 0.944" in findings and "[0.918, 0.94]" in findings
    assert "n=2000" in findings and "causal_abstraction.md" in findings and "max_abs_diff" not in findings
    summary = html[html.index("<h2>Summary</h2>"):]
    assert 'iia <span class="muted">(variable=WX)</span>' in summary  # rows of one metric told apart


def test_an_amended_criterion_shows_the_one_it_replaced(out):
    was = {"threshold": {"op": ">", "value": 3.0}, "reason": "mis-specified", "date": "2026-12-06"}
    rows = [_finding(2.2, True, detail={"amended_from": was, "registered_after_observation": True})]
    html = render_report({**board(), "rows": rows}, out)
    assert "amended 2026-12-06 from &gt; 3" in html


def test_an_attached_page_is_embedded_sandboxed(out):
    """A check's HTML attachment (feature pages) is embedded escaped, in a frame that runs no scripts."""
    (out / "figures" / "real_sae__topk__pages.html").write_text('<html><body><p class="x">latent 7 & "co"</p>'
                                                                 "<script>alert(1)</script></body></html>")
    b = board()
    b["figures"].append({"task": "hier_eq", "method": "das", "name": "pages", "caption": "Feature pages",
                         "path": "figures/real_sae__topk__pages.html"})
    html = render_report(b, out)
    frame = html[html.index('<details class="attached">'):]
    assert frame.startswith('<details class="attached"><summary>Feature pages</summary><iframe sandbox="" srcdoc="')
    assert "&lt;p class=&quot;x&quot;&gt;latent 7 &amp; &quot;co&quot;" in frame
    assert "<script>" not in frame
