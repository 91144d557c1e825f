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
DIR/report.html. Exit status: 0 when every check passed, 1 when any failed (unless
--no-fail), 2 for bad usage."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run the pre-registered checks; write the scoreboard and report",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, BenchConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(BenchConfig, args)
    try:
        board = run_bench(cfg)
    except SelectionError as e:
        raise UsageError(str(e)) from None
    report = f"; report: {Path(cfg.out) / 'report.html'}" if cfg.report else ""
    print(summary(board, cfg.out) + report, file=sys.stderr)
    return exit_status(board, cfg.fail)
