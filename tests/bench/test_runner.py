import io
import json
import math
import random

import numpy as np
import pytest
import torch

from mechscope.bench.context import Result
from mechscope.bench.registry import Registry, SelectionError
from mechscope.bench.runner import BenchConfig, auto_threads, exit_status, merge_figures, run_bench
from mechscope.report.scoreboard import load_scoreboard

TOP_KEYS = {"schema", "mechscope", "torch", "device", "seed", "started", "seconds", "rows"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def _draws(ctx):
    return Result(0.0, detail={"torch": torch.rand(1).item(), "numpy": float(np.random.rand()),
                               "random": random.random(), "seed": ctx.seed, "full": ctx.full})


def make_registry(*, failing=False) -> Registry:
    reg = Registry()
    reg.register("alpha", "das", "iia", (">=", 0.9), kind="check", run=lambda ctx: Result(0.95, baselines={"random": 0.5}))
    reg.register("alpha", "probe", "draws", None, run=_draws)
    reg.register("alpha", "probe", "draws_again", None, run=_draws)
    reg.register("beta", "sae", "mse", ("<=", 0.1), kind="check", run=lambda ctx: 0.5 if failing else 0.05)
    reg.register("beta", "sae", "slow_published", (">=", 0), kind="check", run=lambda ctx: 1.0, full_only=True)
    return reg


def run(tmp_path, registry=None, **options):
    stream = io.StringIO()
    cfg = BenchConfig.from_dict({"out": str(tmp_path / "out"), **options})
    board = run_bench(cfg, registry or make_registry(), stream=stream)
    return board, stream.getvalue()


def test_scoreboard_schema_and_file(tmp_path):
    board, _ = run(tmp_path, seed=3)
    on_disk = json.loads((tmp_path / "out" / "scoreboard.json").read_text())
    assert on_disk == board
    assert TOP_KEYS <= set(board)
    assert board["schema"] == 2 and board["seed"] == 3 and board["device"] == "cpu"
    assert board["torch"] == torch.__version__ and board["complete"] is True
    assert board["started"].endswith("Z") and board["started"][10] == "T"
    assert board["threads"] >= 1
    assert [(r["task"], r["method"], r["metric"]) for r in board["rows"]] == [
        ("alpha", "das", "iia"), ("alpha", "probe", "draws"), ("alpha", "probe", "draws_again"),
        ("beta", "sae", "mse")]
    assert board["rows"][0]["baselines"] == {"random": 0.5}
    assert load_scoreboard(tmp_path / "out" / "scoreboard.json") == board
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp files
    assert exit_status(board) == 0


def test_scoreboard_file_follows_the_umask(tmp_path):
    """A temp file's 0600 must not leak into the scoreboard (others read a shared bench directory)."""
    import os

    old = os.umask(0o022)
    try:
        run(tmp_path, seed=0)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out" / "scoreboard.json").st_mode & 0o777 == 0o644


def test_failed_check_sets_exit_status(tmp_path):
    board, _ = run(tmp_path, registry=make_registry(failing=True))
    assert [r["passed"] for r in board["rows"] if r["task"] == "beta"] == [False]
    assert exit_status(board, fail=True) == 1
    assert exit_status(board, fail=False) == 0


def test_every_check_seeded_alike_from_seed(tmp_path):
    board, _ = run(tmp_path, seed=11)
    first, second = (r["detail"] for r in board["rows"] if r["metric"].startswith("draws"))
    assert first == second and first["seed"] == 11
    torch.manual_seed(11)
    assert first["torch"] == torch.rand(1).item()
    other, _ = run(tmp_path / "b", seed=12)
    assert other["rows"][1]["detail"]["torch"] != first["torch"]


def test_only_and_full(tmp_path):
    board, _ = run(tmp_path, only=["alpha/das", "beta"])
    assert [r["metric"] for r in board["rows"]] == ["iia", "mse"]
    board, _ = run(tmp_path, only=["beta"], full=True)
    assert [r["metric"] for r in board["rows"]] == ["mse", "slow_published"]
    assert board["rows"][0]["detail"] == {}


def test_only_unknown_and_full_only_errors(tmp_path):
    with pytest.raises(SelectionError, match="tasks: alpha, beta"):
        run(tmp_path, only=["gamma"])
    reg = Registry()
    reg.register("beta", "sae", "slow", None, run=lambda ctx: 1.0, full_only=True)
    with pytest.raises(SelectionError, match="full-only; add --full"):
        run(tmp_path, registry=reg, only=["beta"])
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_exception_and_nan_are_failed_rows_and_run_continues(tmp_path):
    reg = Registry()

    def broken(ctx):
        raise RuntimeError("shape mismatch [2, 3] vs [3]")

    reg.register("alpha", "das", "iia", (">=", 0.9), kind="check", run=broken)
    reg.register("alpha", "das", "nan_metric", (">=", 0.9), kind="check", run=lambda ctx: math.nan)
    reg.register("alpha", "probe", "accuracy", (">=", 0.9), kind="check", run=lambda ctx: 1.0)
    board, log = run(tmp_path, registry=reg)
    err, nan, ok = board["rows"]
    assert err["passed"] is False and err["value"] is None
    assert err["error"].startswith("RuntimeError: shape mismatch [2, 3] vs [3] (at test_runner.py:")
    assert nan["passed"] is False and "not finite" in nan["error"]
    assert ok["passed"] is True
    assert exit_status(board) == 1
    assert "ERROR iia: RuntimeError" in log
    json.loads((tmp_path / "out" / "scoreboard.json").read_text())  # strict JSON, no NaN


def test_progress_lines_when_not_a_tty(tmp_path):
    _, log = run(tmp_path)
    lines = log.splitlines()
    assert "\r" not in log and "\x1b" not in log
    assert lines[0] == "[1/4] alpha/das/iia ..."
    assert lines[1].startswith("[1/4] alpha/das/iia: PASS iia 0.95 >= 0.9 (0s; elapsed")
    assert "left ~" in lines[1]
    assert lines[-1].startswith("[4/4] beta/sae/mse: PASS mse 0.05 <= 0.1")


def test_check_logging_goes_to_progress_and_file(tmp_path):
    reg = Registry()

    def chatty(ctx):
        ctx.log.info("trained %d steps", 10)
        ctx.log.debug("only in the file")
        return 1.0

    reg.register("alpha", "das", "iia", None, run=chatty)
    _, log = run(tmp_path, registry=reg)
    assert "  alpha.das: trained 10 steps" in log and "only in the file" not in log
    text = (tmp_path / "out" / "bench.log").read_text()
    assert "trained 10 steps" in text and "only in the file" in text


def test_threads_recorded_and_restored(tmp_path):
    before = torch.get_num_threads()
    seen = []
    reg = Registry()
    reg.register("alpha", "das", "iia", None, run=lambda ctx: seen.append(torch.get_num_threads()) or 1.0)
    board, _ = run(tmp_path, registry=reg, threads=1)
    assert board["threads"] == 1 and seen == [1]
    assert torch.get_num_threads() == before
    assert [auto_threads(n) for n in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 4, 4]


def test_figures_saved_listed_and_embedded(tmp_path):
    reg = Registry()

    def plotting(ctx):
        with ctx.figure("curve", caption="a curve") as fig:
            fig.add_subplot().plot([0, 1, 2], [0, 1, 4])
        ctx.add_figure(PNG, "raw")
        return 1.0

    reg.register("alpha", "das", "iia", None, run=plotting)
    board, _ = run(tmp_path, registry=reg)
    assert [(f["name"], f["path"]) for f in board["figures"]] == [
        ("curve", "figures/alpha__das__curve.png"), ("raw", "figures/alpha__das__raw.png")]
    assert (tmp_path / "out" / "figures" / "alpha__das__curve.png").read_bytes().startswith(PNG[:8])
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "a curve" in html


def test_bad_figure_is_a_failed_row(tmp_path):
    reg = Registry()
    reg.register("alpha", "das", "iia", None, run=lambda ctx: ctx.add_figure(b"GIF89a", "x"))
    board, _ = run(tmp_path, registry=reg)
    assert "not a PNG image" in board["rows"][0]["error"]


def test_bad_options_rejected_before_running(tmp_path):
    from mechscope.core.config import ConfigError

    with pytest.raises(ConfigError, match="threads must be >= 0"):
        BenchConfig(threads=-1)
    with pytest.raises(ConfigError, match="not a torch device"):
        run(tmp_path, device="gpu-please")


def test_merge_figures_replaces_same_name():
    a = {"task": "t", "method": "m", "name": "x", "path": "1"}
    b = {"task": "t", "method": "m", "name": "x", "path": "2"}
    c = {"task": "t", "method": "m", "name": "y", "path": "3"}
    assert merge_figures([a, c], [b]) == [c, b]


def test_without_matplotlib_figures_become_notes(tmp_path, monkeypatch):
    from mechscope.report import figures

    monkeypatch.setattr(figures, "matplotlib_available", lambda: False)
    reg = Registry()

    def plotting(ctx):
        with ctx.figure("curve") as fig:
            axes = fig.subplots(1, 2)
            axes[0].plot([0, 1], [1, 0])
        return 1.0

    reg.register("alpha", "das", "iia", None, run=plotting)
    board, _ = run(tmp_path, registry=reg)
    assert board["rows"][0]["value"] == 1.0 and "error" not in board["rows"][0]
    assert board["figures"][0]["missing"].startswith("matplotlib is not installed")
    assert "matplotlib is not installed" in (tmp_path / "out" / "report.html").read_text()


def test_check_module_that_fails_to_import_is_a_failed_row(tmp_path, monkeypatch):
    import mechscope.bench.runner as runner
    from mechscope.bench.catalog import load_catalog

    failures = load_catalog(["mechscope.bench.no_such_checks"])
    assert [(name, type(e)) for name, e in failures] == [("mechscope.bench.no_such_checks", ModuleNotFoundError)]
    monkeypatch.setattr(runner, "REGISTRY", make_registry())
    monkeypatch.setattr(runner, "load_catalog", lambda **kw: failures)
    cfg = BenchConfig(out=tmp_path / "out")
    board = run_bench(cfg, stream=io.StringIO())
    row = board["rows"][0]
    assert (row["task"], row["method"], row["metric"], row["passed"]) == ("bench", "no_such_checks", "import", False)
    assert "mechscope.bench.no_such_checks failed to import: ModuleNotFoundError" in row["error"]
    assert exit_status(board) == 1
    with pytest.raises(SelectionError, match="no_such_checks failed to import"):
        run_bench(cfg.replace(only=("gamma",)), stream=io.StringIO())


def test_world_model_loads_the_shipped_model_or_retrains_at_the_runs_seed(tmp_path):
    import logging
    from types import SimpleNamespace

    from mechscope.bench.context import CheckContext

    calls = []
    world = SimpleNamespace(load=lambda: "shipped", Recipe=lambda seed: ("recipe", seed),
                            train=lambda recipe: calls.append(recipe) or "retrained")

    def ctx(full):
        return CheckContext(task="t", method="m", seed=7, full=full, device="cpu", out_dir=tmp_path,
                            log=logging.getLogger("test-world-model"))
    assert ctx(False).world_model(world, "a toy") == "shipped" and calls == []
    assert ctx(True).world_model(world, "a toy") == "retrained" and calls == [("recipe", 7)]


def test_a_suite_runs_only_its_own_checks_and_records_its_models(tmp_path):
    reg = make_registry()

    def real_row(ctx):
        ctx.record_model({"model": "tiny", "model_sha256": "ab" * 32})
        ctx.record_model({"model": "tiny", "model_sha256": "ab" * 32})  # recorded once
        return 1.0

    reg.register("gemma", "structure", "gap", ("<=", 1e-4), kind="check", run=lambda ctx: 0.0, suite="real")
    reg.register("gemma", "induction", "stripe", (">=", 0.4), kind="finding", run=real_row, suite="real")
    board = run_bench(BenchConfig(out=tmp_path / "a", suite="real", report=False), reg, stream=io.StringIO())
    assert [r["task"] for r in board["rows"]] == ["gemma", "gemma"] and board["suite"] == "real"
    assert board["models"] == [{"model": "tiny", "model_sha256": "ab" * 32}]
    default = run_bench(BenchConfig(out=tmp_path / "b", report=False), reg, stream=io.StringIO())
    assert "gemma" not in {r["task"] for r in default["rows"]} and default["models"] == []
    with pytest.raises(SelectionError, match="unknown check name 'gemma'"):
        run_bench(BenchConfig(out=tmp_path / "c", only=("gemma",), report=False), reg, stream=io.StringIO())


def test_summary_prints_peak_memory_and_cache_builds_apart(tmp_path):
    from mechscope.bench.runner import summary

    def builds(ctx):
        ctx.record_cache_build("activation store", 90.0)
        return Result(1.0)

    reg = make_registry()
    reg.register("gamma", "store", "built", None, run=builds)
    board, _ = run(tmp_path, registry=reg)
    assert board["cache_builds"] == [{"task": "gamma", "method": "store", "what": "activation store", "seconds": 90.0}]
    assert isinstance(board["peak_rss_bytes"], int) and board["peak_rss_bytes"] > 2 ** 20
    line = summary({**board, "seconds": 100.0}, tmp_path)
    assert "in 1m40s (10s without the caches built: activation store 1m30s)" in line
    assert f"peak memory {board['peak_rss_bytes'] / 2 ** 30:.2f} GiB" in line


def test_dtype_is_for_the_real_suite_and_reaches_the_reference_model(tmp_path, monkeypatch):
    from mechscope.bench import real_model
    from mechscope.bench.context import CheckContext
    from mechscope.core.config import ConfigError

    with pytest.raises(ConfigError, match="--dtype bfloat16 applies to the real suite"):
        run(tmp_path, dtype="bfloat16")
    loads = []
    monkeypatch.setattr(real_model, "load_model", lambda name, **kw: loads.append(kw) or (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(real_model, "model_record", lambda name, model: {"name": name})
    monkeypatch.setattr(real_model, "_LOADED", {})
    ctx = CheckContext(task="t", method="m", seed=0, full=False, device="cpu", out_dir=tmp_path,
                       log=__import__("logging").getLogger("t"), dtype="bfloat16")
    real_model.reference_model(ctx)
    real_model.reference_model(ctx)  # loaded once per (device, dtype)
    assert loads == [{"device": "cpu", "attn": "eager", "dtype": "bfloat16"}]
