import json

from mechscope.causal.persist import load_alignment
from mechscope.cli import main
from mechscope.tasks import hierarchical_equality as he


def test_das_command_prints_the_table_and_writes_the_alignment(tmp_path, capsys):
    out = tmp_path / "al"
    code = main(["das", "--n-train", "600", "--n-test", "200", "--epochs", "2", "--batch-size", "256",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0
    assert "das" in printed.out and "random_subspace" in printed.out and "full_vector" in printed.out
    assert "pairs kept" in printed.out and f"wrote {out}" in printed.err
    al = load_alignment(out, he.load_model())
    assert al.variables == ("WX", "YZ") and al["WX"].size == 8
    meta = json.loads((out / "alignment.json").read_text())["meta"]
    assert set(meta["iia"]) == {"WX", "YZ", "WX+YZ"}


def test_das_command_usage_errors(capsys):
    assert main(["das", "--variables", "WY"]) == 2
    assert "has no variable(s) ['WY']; choose from ['WX', 'YZ']" in capsys.readouterr().err
    assert main(["das", "--dims", "9", "--n-train", "50", "--n-test", "50", "--epochs", "1"]) == 2
    assert "ask for 18 dimensions in all" in capsys.readouterr().err
    assert main(["das", "--position", "1"]) == 2
    assert "--position is for transformers" in capsys.readouterr().err
    assert main(["das", "--method", "magic"]) == 2
