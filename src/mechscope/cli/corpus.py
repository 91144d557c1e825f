"""``mechscope corpus install|path NAME``: text corpora from a package registry (see
:mod:`mechscope.core.corpora`). ``install`` is the one step that uses the network; every other
command reads the installed files.
"""

from __future__ import annotations

import argparse
import os
import sys

from mechscope.cli import UsageError

HELP = "install a text corpus from a package registry, or print where its files are"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mechscope.core.corpora import CORPORA

    parser = subparsers.add_parser("corpus", help=HELP, description=HELP + ". Corpora: " + ", ".join(
        f"{c.name} (Debian's {c.package}, {c.licence})" for c in CORPORA.values()))
    parser.add_argument("action", choices=("install", "path"),
                        help="install: fetch and unpack it into mechscope's cache (network); path: print its "
                             "directory and file count")
    parser.add_argument("name", choices=sorted(CORPORA), help="the corpus")
    return parser


def run(args: argparse.Namespace) -> int:
    from mechscope.core.corpora import CorpusError, corpus_files, install_corpus

    try:
        if args.action == "install":
            where = install_corpus(args.name)
            print(f"corpus {args.name} is in {where}", file=sys.stderr)
        files = corpus_files(args.name)
    except CorpusError as e:
        raise UsageError(str(e)) from None
    size = sum(f.stat().st_size for f in files)
    print(f"{files[0].parent if len(files) == 1 else _common(files)}  ({len(files)} files, {size / 1e6:.1f} MB)")
    return 0


def _common(files: list) -> str:
    return os.path.commonpath([str(f) for f in files])
