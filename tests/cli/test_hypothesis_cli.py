"""``mechscope hypothesis test|compare|scrub`` (issue 21): built-in worlds and hypothesis files."""

import json
from pathlib import Path

import pytest

from mechscope.cli import main
from mechscope.tasks import rival_variables as rv


def write(tmp_path, name, spec):
    path = tmp_path / name
    path.write_text(json.dumps(spec), encoding="utf-8")
    return str(path)


def s_file(tmp_path, name="S file", layer=1, featurizer="identity", variable="S", cm="S", features=None):
    place = {"site": f"acts.{layer}", "featurizer": featurizer,
             "features": list(rv.XY_UNITS) if features is None else features}
    return write(tmp_path, f"{name}.json", {"name": name, "causal_model": cm, "variables": {variable: place}})


def test_test_and_compare_on_the_built_in_world(capsys):
    assert main(["hypothesis", "test", "--pairs", "200"]) == 0
    out = capsys.readouterr().out
    assert "hypothesis 'S at hidden.1'" in out and "200 of 200 pairs kept" in out and "1.000  [0.981, 1.000]" in out
    assert main(["hypothesis", "compare", "--pairs", "200", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["winner"] == "S at hidden.1" and res["joint"]["ci95"][0] > 0.5


def test_hypothesis_files_name_variables_sites_and_featurizers(tmp_path, capsys):
    s = s_file(tmp_path, "S neurons")
    t = s_file(tmp_path, "T neurons", variable="T", cm="T")
    assert main(["hypothesis", "compare", "--hypothesis", s, "--rival", t, "--pairs", "200"]) == 0
    assert "'S neurons' beats 'T neurons' on the same 200 pairs" in capsys.readouterr().out
    # PCA of the whole of hidden.0 (all features): the XY block's information and z's together, so S fails
    whole = s_file(tmp_path, "S pca", layer=0, featurizer="pca", features=None)
    spec = json.loads(Path(whole).read_text(encoding="utf-8"))
    del spec["variables"]["S"]["features"]
    whole = write(tmp_path, "pca.json", spec)
    assert main(["hypothesis", "test", "--hypothesis", whole, "--pairs", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["joint"]["iia"] < 0.5


def test_scrub_built_in_and_from_a_file(tmp_path, capsys):
    assert main(["hypothesis", "scrub", "--world", "hierarchical_equality", "--hypothesis", "wx_only",
                 "--inputs", "400", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["hypothesis"] == "wx_only" and res["recovered"] < 0.5 and res["n"] == 400
    spec = {"name": "from file", "output": ["hidden.2"],
            "claims": {"hidden.2": {"parents": ["hidden.1"], "key": "O"},
                       "hidden.1": {"parents": ["hidden.0"], "key": "WX+YZ"}, "hidden.0": {}}}
    path = write(tmp_path, "scrub.json", spec)
    assert main(["hypothesis", "scrub", "--world", "hierarchical_equality", "--hypothesis", path,
                 "--inputs", "400"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(("'from file' recovers 0.9", "'from file' recovers 1.0"))


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["hypothesis", "test", "--world", "othello"], "test and compare run on rival_variables, hierarchical_equality"),
    (["hypothesis", "scrub", "--world", "rival_variables"], "scrub runs on induction, hierarchical_equality"),
    (["hypothesis", "test", "--world", "hierarchical_equality"], "has no built-in hypothesis; give --hypothesis FILE"),
    (["hypothesis", "compare", "--hypothesis", "a.json"], "compare needs both --hypothesis FILE and --rival FILE"),
    (["hypothesis", "scrub", "--world", "induction", "--hypothesis", "v_composition"],
     "is neither a hypothesis of induction (k_composition, q_composition) nor a JSON file"),
    (["hypothesis", "test", "--hypothesis", "/nonexistent/h.json"], "No such file or directory"),
    (["hypothesis", "disentangle", "--world", "induction"], "disentangle runs on ravel"),
    (["hypothesis", "disentangle", "--world", "ravel", "--hypothesis", "a.json"], "--hypothesis and --rival are for"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_bad_hypothesis_files_exit_2_with_one_line(tmp_path, capsys):
    def err(spec, action="test"):
        return one_line_error(capsys, ["hypothesis", action, "--hypothesis", write(tmp_path, "h.json", spec),
                                       "--pairs", "50"])

    place = {"site": "acts.1", "features": [0, 1]}
    # variables that do not match the causal model
    assert "aligns variable 'U', which its causal model does not have" in err(
        {"name": "h", "causal_model": "S", "variables": {"U": place}})
    # an alignment at a site the model lacks
    assert "variable 'S': no module at path 'acts.9' in MLP; did you mean" in err(
        {"name": "h", "causal_model": "S", "variables": {"S": {"site": "acts.9"}}})
    assert "causal_model 'Q' is not one of this world's: ['S', 'T']" in err(
        {"name": "h", "causal_model": "Q", "variables": {"S": place}})
    assert "featurizer 'sae' is not one of ['identity', 'pca']" in err(
        {"name": "h", "causal_model": "S", "variables": {"S": {**place, "featurizer": "sae"}}})
    assert "unknown field(s) ['feature']" in err(
        {"name": "h", "causal_model": "S", "variables": {"S": {"site": "acts.1", "feature": [0]}}})
    assert "feature indices [40] exceed the featurizer's 32 features" in err(
        {"name": "h", "causal_model": "S", "variables": {"S": {"site": "acts.1", "features": [40]}}})
    # overlapping features for two variables at one site (one featurizer per site and kind, so the overlap is seen)
    both = {"name": "overlap", "variables": {"WX": {"site": "acts.0", "features": [0, 1, 2]},
                                             "YZ": {"site": "acts.0", "features": [2, 3]}}}
    assert "variables 'WX' and 'YZ' overlap at site acts.0:output: both hold features [2]" in one_line_error(
        capsys, ["hypothesis", "test", "--world", "hierarchical_equality", "--hypothesis",
                 write(tmp_path, "o.json", both)])
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    assert "not valid JSON" in one_line_error(capsys, ["hypothesis", "test", "--hypothesis", str(tmp_path / "bad.json")])


def test_a_scrubbing_file_whose_graph_is_not_a_subgraph_exits_2(tmp_path, capsys):
    spec = {"name": "skip", "output": ["hidden.2"], "claims": {"hidden.2": {"parents": ["hidden.0"]}, "hidden.0": {}}}
    err = one_line_error(capsys, ["hypothesis", "scrub", "--world", "hierarchical_equality", "--hypothesis",
                                  write(tmp_path, "s.json", spec), "--inputs", "100"])
    assert "claims the edges ['hidden.0'] -> hidden.2, which the model graph does not have" in err
    spec = {"name": "k", "output": ["hidden.2"], "claims": {"hidden.2": {"key": "WZ"}}}
    err = one_line_error(capsys, ["hypothesis", "scrub", "--world", "hierarchical_equality", "--hypothesis",
                                  write(tmp_path, "k.json", spec), "--inputs", "100"])
    assert "key 'WZ' is not one of this world's: ['O', 'WX', 'WX+YZ', 'YZ']" in err


def test_disentangle_prints_the_bench_table(capsys, monkeypatch):
    """The command prints the bench's RAVEL table (computed by bench.ravel_checks.table, not here)."""
    from mechscope.bench import ravel_checks
    from mechscope.causal.disentangle import DisentangleResult, Score

    def result(c, i):
        return DisentangleResult(Score(c, (c - 0.1, c), 10), Score(i, (i - 0.1, i), 10),
                                 Score((c + i) / 2, ((c + i) / 2 - 0.05, (c + i) / 2 + 0.05), 20), {}, {}, {}, {})

    calls = []

    def table(seed, full):
        calls.append((seed, full))
        return {"results": {"das": result(0.5, 0.9), "sae": result(0.0, 1.0)},
                "controls": {"full_vector": result(0.8, 0.2)}, "setting": "reduced", "site": "blocks.0"}

    monkeypatch.setattr(ravel_checks, "table", table)
    assert main(["hypothesis", "disentangle", "--world", "ravel", "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert calls == [(3, False)] and out[0].startswith("RAVEL world (reduced setting, seed 3)")
    assert out[2].split() == ["das", "0.500", "0.900", "0.700", "[0.650,", "0.750]"]
    assert out[4].split()[:3] == ["control:", "full_vector", "0.800"]
    assert main(["hypothesis", "disentangle", "--world", "ravel", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sae"]["cause"]["value"] == 0.0
