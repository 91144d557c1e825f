"""The ``mechscope`` command: one subcommand per module of this package.

A subcommand module ``mechscope/cli/<name>.py`` exposes ``add_parser(subparsers)``, which
adds and returns its ``argparse`` parser (options from a config, see
:func:`mechscope.core.config.add_config_arguments`), and ``run(args) -> int``, the exit
status. ``run`` raises :class:`UsageError` (or ``ConfigError``, or any error type mechscope
defines) for bad input: ``main`` prints it on one line and exits 2; anything else exits 1
with one line, and ``--debug`` (anywhere on the line) adds the traceback
(:mod:`mechscope.cli.errors`). Modules must not import torch at import time, so that
``mechscope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Sequence

SUBCOMMANDS = ("bench", "report", "sites", "train", "das", "spd", "probe", "steer", "reft", "sae", "store", "corpus",
               "hypothesis")


class UsageError(Exception):
    """The command was given options that cannot work; the message says how to fix them."""


def _subcommand(name: str) -> ModuleType | None:
    module = f"{__name__}.{name}"
    if importlib.util.find_spec(module) is None:  # listed but not written yet
        return None
    return importlib.import_module(module)


def _summary(module: ModuleType) -> str:
    """First sentence of a subcommand module's docstring, without its ``mechscope X``: prefix."""
    doc = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    doc = re.sub(r"^``[^`]*``:\s*", "", doc)
    return getattr(module, "HELP", doc.split(". ")[0].rstrip("."))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command's parser. Only the subcommand named in ``argv`` gets its full parser
    (whose options may need torch-backed configs); the others are listed by their
    one-line summary, so ``mechscope --help`` stays fast and imports no torch."""
    from mechscope import __version__

    parser = argparse.ArgumentParser(
        prog="mechscope",
        description="Mechanistic interpretability on one primitive: an intervention at a site of "
                    "an unmodified PyTorch model.",
        epilog="Run `mechscope COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"mechscope {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback too (may be given after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = list(sys.argv[1:] if argv is None else argv)
    chosen = next((w for w in words if not w.startswith("-")), None)
    for name in SUBCOMMANDS:
        module = _subcommand(name)
        if module is None:
            continue
        if chosen is None or name == chosen:
            sub = module.add_parser(subparsers) if name == chosen else subparsers.add_parser(name, help=_summary(module))
            sub.set_defaults(_run=module.run)
        else:
            subparsers.add_parser(name, help=_summary(module))
    return parser


def _deepest(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` chose, e.g. ``mechscope sae train``'s."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions else None
        if chosen not in (actions[0].choices if actions else {}):
            return parser
        parser = actions[0].choices[chosen]


def _split_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (before any ``--``), and whether it was there."""
    words = list(sys.argv[1:] if argv is None else argv)
    end = words.index("--") if "--" in words else len(words)
    kept = [w for w in words[:end] if w != "--debug"] + words[end:]
    return kept, len(kept) != len(words) or os.environ.get("MECHSCOPE_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input, 1 for a failure)."""
    from mechscope.cli.errors import one_line_warnings, report

    argv, debug = _split_debug(argv)
    parser = build_parser(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's own parser, with its own usage line
            _deepest(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version, or a usage error argparse printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        with one_line_warnings(args.command):
            return int(args._run(args))
    except KeyboardInterrupt:
        print(f"mechscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit status
        return report(e, args.command, debug)


def console() -> int:
    """The installed ``mechscope`` command: :func:`main` in a process that keeps freed memory
    for reuse (:mod:`mechscope.core.alloc`; a process-wide setting, so not part of ``main``,
    which tests and scripts call in their own processes)."""
    from mechscope.core.alloc import retain_freed_memory

    retain_freed_memory()
    return main()
