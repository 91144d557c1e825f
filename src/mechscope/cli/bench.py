"""``mechscope bench``: run the pre-registered checks, write scoreboard.json and report.html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechscope.bench.registry import SelectionError
from mechscope.bench.runner import BenchConfig, exit_status, run_bench, summary
from mechscope.cli import UsageError
from mechscope.core.config import add_config_arguments, config_from_args

DESCRIPTION = """\
Run every built-in task with every method that applies, score each result against its
pre-registered threshold beside its baselines, and write DIR/scoreboard.json and
DIR/report.html. Rows are checks (the program is right), findings (published claims about
networks, reproduced or not) or info. Exit status: 0 when every check passed, 1 when a
check failed or a row raised (unless --no-fail; with --strict also when a finding was not
reproduced), 2 for bad usage."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run the pre-registered checks; write the scoreboard and report",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, BenchConfig)
    parser.add_argument("--list", action="store_true",
                        help="print every registered row with its kind, criterion and source (markdown) and exit")
    return parser


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(BenchConfig, args)
    if args.list:
        return _list(cfg.suite)
    try:
        board = run_bench(cfg)
    except SelectionError as e:
        raise UsageError(str(e)) from None
    report = f"; report: {Path(cfg.out) / 'report.html'}" if cfg.report else ""
    print(summary(board, cfg.out) + report, file=sys.stderr)
    return exit_status(board, cfg.fail, cfg.strict)


def _list(suite: str) -> int:
    from mechscope.bench.catalog import load_catalog
    from mechscope.bench.listing import rows_markdown
    from mechscope.bench.registry import REGISTRY

    failures = load_catalog(suite=suite)
    for name, e in failures:
        print(f"error: check module {name} failed to import: {type(e).__name__}: {e}", file=sys.stderr)
    print(rows_markdown(REGISTRY, suite), end="")
    return 1 if failures else 0
