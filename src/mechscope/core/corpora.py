"""Text corpora installed from a package registry: English text with a permissive licence for
the real-model suite and the examples, never committed and never fetched at run time.

``python-docs``: the reStructuredText sources of the Python 3.11 documentation, as Debian's
``python3.11-doc`` package ships them (``html/_sources/**/*.rst.txt``: 497 files, 11 MB of
English prose with code samples; PSF licence). :func:`corpus_files` finds them where the
Debian package is installed (``/usr/share/doc/python3.11/html/_sources``), else in mechscope's
cache (``cache_root()/corpora/python-docs``). :func:`install_corpus` puts them there: it asks
``apt-get download`` for the package (the one step that uses the network, run only when asked:
``mechscope corpus install python-docs``, or ``make bench-real``), unpacks it with
``dpkg-deb -x`` and keeps the sources, moved into place in one rename so that an interrupted
install leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mechscope.core.load import cache_root


class CorpusError(ValueError):
    """A corpus that is unknown, not installed, or could not be installed."""


@dataclass(frozen=True)
class Corpus:
    name: str
    package: str  # the Debian package that ships it
    sources: str  # the directory of the text inside the package
    pattern: str  # the files of the corpus below it
    licence: str


CORPORA = {
    "python-docs": Corpus("python-docs", "python3.11-doc", "usr/share/doc/python3.11/html/_sources",
                          "**/*.rst.txt", "PSF licence (Python Software Foundation License Version 2)"),
}


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    return CORPORA[name]


def corpus_dir(name: str) -> Path:
    """Where :func:`install_corpus` puts ``name``: ``cache_root()/corpora/NAME``."""
    return cache_root() / "corpora" / _corpus(name).name


def corpus_files(name: str, system_root: Path = Path("/")) -> list[Path]:
    """The files of corpus ``name`` in a fixed (sorted) order: from the installed Debian package
    if there is one, else from mechscope's cache; a :class:`CorpusError` says how to install it."""
    corpus = _corpus(name)
    for base in (system_root / corpus.sources, corpus_dir(name)):
        files = sorted(base.glob(corpus.pattern)) if base.is_dir() else []
        if files:
            return files
    raise CorpusError(f"corpus {name!r} is not installed; run `mechscope corpus install {name}` (it downloads "
                      f"Debian's {corpus.package} package with apt-get) or install that package")


def resolve_corpus(spec: str | Path) -> Path | list[Path]:
    """What a ``--corpus`` names: an existing path as it is, else a corpus name's files
    (:func:`corpus_files`), else the path (whose reader then says it does not exist)."""
    path = Path(spec).expanduser()
    if not path.exists() and str(spec) in CORPORA:
        return corpus_files(str(spec))
    return path


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def install_corpus(name: str, run: Runner | None = None) -> Path:
    """Fetch and unpack corpus ``name`` into :func:`corpus_dir` (see the module docstring); a
    no-op when it is there already. Returns the directory. ``run`` runs the two package tools
    (default: :func:`subprocess.run`)."""
    corpus, target = _corpus(name), corpus_dir(name)
    run = run or subprocess.run
    if target.is_dir() and any(target.glob(corpus.pattern)):
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"installing corpus {name!r} needs {tool} (Debian's package tools), which is not on "
                              f"PATH; install the {corpus.package} package another way and point --corpus at its "
                              f"{corpus.sources} directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{corpus.name}-") as tmp:
        work = Path(tmp)
        _run(run, ["apt-get", "download", corpus.package], work, f"download {corpus.package}")
        debs = sorted(work.glob(f"{corpus.package}_*.deb"))
        if not debs:
            raise CorpusError(f"apt-get download {corpus.package} left no .deb file in {work}")
        _run(run, ["dpkg-deb", "-x", str(debs[0]), str(work / "root")], work, f"unpack {debs[0].name}")
        sources = work / "root" / corpus.sources
        if not any(sources.glob(corpus.pattern)):
            raise CorpusError(f"{debs[0].name} holds no {corpus.pattern} under {corpus.sources}")
        if target.exists():  # an earlier install without the files: replace it
            shutil.rmtree(target)
        sources.rename(target)  # one rename: the corpus is there whole or not at all
    return target


def _run(run: Runner, argv: list[str], cwd: Path, what: str) -> None:
    done = run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise CorpusError(f"could not {what} (`{' '.join(argv)}` exited {done.returncode}: {last[0]})")
