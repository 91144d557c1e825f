import json
import subprocess
import sys

import pytest

import mechscope.bench.runner as runner
from mechscope.bench.context import Result
from mechscope.bench.registry import Registry
from mechscope.cli import SUBCOMMANDS, main


@pytest.fixture
def fake_checks(monkeypatch):
    """Replace the catalog with a registry of two fake checks; returns it for additions."""
    reg = Registry()
    reg.register("alpha", "das", "iia", (">=", 0.9), kind="check", run=lambda ctx: Result(0.95))
    reg.register("beta", "probe", "accuracy", (">=", 0.9), kind="check", run=lambda ctx: 0.97)
    monkeypatch.setattr(runner, "REGISTRY", reg)
    monkeypatch.setattr(runner, "load_catalog", lambda **kw: [])
    return reg


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "report" in out


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["bench", "--seed", "x"]) == 2
    assert "argument --seed: expected int, got 'x'" in capsys.readouterr().err
    assert main(["bench", "--seed", "-1"]) == 2
    assert "seed must be >= 0" in capsys.readouterr().err


def test_bench_pass_fail_and_no_fail(tmp_path, fake_checks, capsys):
    out = tmp_path / "o"
    assert main(["bench", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "checks 2/2 · findings 0/0 reproduced · 0 for information" in err and str(out / "report.html") in err
    assert (out / "report.html").is_file()
    fake_checks.register("beta", "probe", "broken", (">=", 0.9), kind="check", run=lambda ctx: 1 / 0)
    assert main(["bench", "--out", str(out)]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert main(["bench", "--out", str(out), "--no-fail"]) == 0
    board = json.loads((out / "scoreboard.json").read_text())
    assert [r["passed"] for r in board["rows"]] == [True, True, False]


def test_bench_only(tmp_path, fake_checks, capsys):
    out = tmp_path / "o"
    assert main(["bench", "--out", str(out), "--only", "beta/probe", "--no-report"]) == 0
    board = json.loads((out / "scoreboard.json").read_text())
    assert [r["task"] for r in board["rows"]] == ["beta"]
    assert not (out / "report.html").exists()
    assert main(["bench", "--out", str(out), "--only", "alpha,gamma"]) == 2
    err = capsys.readouterr().err
    assert "mechscope bench: error: unknown check name 'gamma'" in err
    assert "tasks: alpha, beta" in err and "task/method: alpha/das, beta/probe" in err


def test_report_subcommand(tmp_path, fake_checks, capsys):
    out = tmp_path / "o"
    assert main(["bench", "--out", str(out), "--no-report"]) == 0
    capsys.readouterr()
    assert main(["report", "--scoreboard", str(out / "scoreboard.json")]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert "<h2>Summary</h2>" in (out / "report.html").read_text()
    assert main(["report", "--scoreboard", str(out / "scoreboard.json"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    assert main(["report", "--scoreboard", str(tmp_path / "nope.json")]) == 2
    assert "no scoreboard at" in capsys.readouterr().err


def test_subcommands_listed_in_one_place():
    assert SUBCOMMANDS[:2] == ("bench", "report")


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_importing_and_help_do_not_load_torch_or_matplotlib():
    out = _python("import sys, contextlib, io\n"
                  "import mechscope, mechscope.bench, mechscope.report\n"
                  "from mechscope.cli import main\n"
                  "with contextlib.redirect_stdout(io.StringIO()):\n"
                  "    assert main(['--help']) == 0 and main(['bench', '--help']) == 0\n"
                  "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "mechscope", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().startswith("mechscope ")
    result = subprocess.run([sys.executable, "-m", "mechscope", "bench", "--nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "unrecognized arguments: --nope" in result.stderr


def test_bench_out_is_locked_and_a_stale_lock_taken_over(tmp_path, fake_checks, capsys):
    import os
    import socket

    from mechscope.core.lock import LOCK_NAME

    out = tmp_path / "o"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (os.getppid(), gone.pid):
        (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then",
                                                 "job": None, "token": "t"}))
        code = main(["bench", "--out", str(out), "--no-report"])
        err = capsys.readouterr().err
        if pid == os.getppid():  # a live job holds it: refused at once, nothing written
            assert code == 2 and f"in use by another job (PID {pid} on host" in err
            assert not (out / "scoreboard.json").exists()
        else:
            assert code == 0 and f"mechscope bench: warning: taking over the stale lock of --out {out}" in err
            assert f"process {pid} is no longer running" in err and (out / "scoreboard.json").exists()
    assert not (out / LOCK_NAME).exists()
