"""``mechscope report``: render report.html again from a scoreboard and its figures/."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, add_config_arguments, config, config_from_args, param


@config
class ReportConfig(Config):
    """Options of ``mechscope report``."""

    scoreboard: Path = param(Path("bench-out/scoreboard.json"), metavar="PATH",
                             help="scoreboard.json written by `mechscope bench`")
    out: Optional[Path] = param(None, metavar="FILE", help="HTML file to write (default: report.html beside the "
                                "scoreboard)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="render report.html from a scoreboard",
        description="Render the self-contained HTML report of a bench run from its scoreboard.json "
                    "(figures are read from figures/ beside it) and print the report's path.")
    add_config_arguments(parser, ReportConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    from mechscope.core.atomic import atomic_write
    from mechscope.report.scoreboard import ScoreboardError, load_scoreboard
    from mechscope.core.paths import output_file
    from mechscope.report.html import render_report

    cfg = config_from_args(ReportConfig, args)
    try:
        board = load_scoreboard(cfg.scoreboard)
    except ScoreboardError as e:
        raise UsageError(str(e)) from None
    out = output_file(cfg.out or cfg.scoreboard.parent / "report.html", "--out")
    atomic_write(out, render_report(board, cfg.scoreboard.parent))
    print(out)
    return 0
