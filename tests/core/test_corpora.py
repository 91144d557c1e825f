"""Corpora from a package registry: found where the package is installed or in the cache,
installed by `apt-get download` + `dpkg-deb -x` (faked here: no network), atomically."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from mechscope.cli import main
from mechscope.core import corpora
from mechscope.core.corpora import CorpusError, corpus_dir, corpus_files, install_corpus

SOURCES = "usr/share/doc/python3.11/html/_sources"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return tmp_path / "cache"


def fake_apt(calls, fail_at=None):
    """A runner that plays apt-get download and dpkg-deb -x: the .deb unpacks to two .rst.txt files."""
    def run(argv, cwd, **kwargs):
        calls.append(argv[:2])
        if argv[0] == fail_at:
            return subprocess.CompletedProcess(argv, 100, "", "E: Unable to locate package")
        if argv[:2] == ["apt-get", "download"]:
            (Path(cwd) / "python3.11-doc_3.11.2_all.deb").write_bytes(b"!<arch>")
        elif argv[:2] == ["dpkg-deb", "-x"]:
            src = Path(argv[3]) / corpora.CORPORA["python-docs"].sources
            (src / "library").mkdir(parents=True)
            (src / "library" / "os.rst.txt").write_text("The os module.\n")
            (src / "tutorial.rst.txt").write_text("An informal tutorial.\n")
        return subprocess.CompletedProcess(argv, 0, "", "")
    return run


def test_install_unpacks_into_the_cache_once_and_files_come_sorted(cache):
    calls = []
    where = install_corpus("python-docs", run=fake_apt(calls))
    assert where == corpus_dir("python-docs") == cache / "corpora" / "python-docs"
    files = corpus_files("python-docs", system_root=cache / "nowhere")
    assert [f.relative_to(where).as_posix() for f in files] == ["library/os.rst.txt", "tutorial.rst.txt"]
    assert install_corpus("python-docs", run=fake_apt(calls)) == where and len(calls) == 2  # no second download


def test_a_failed_download_leaves_nothing_behind(cache):
    with pytest.raises(CorpusError, match="could not download python3.11-doc.*Unable to locate package"):
        install_corpus("python-docs", run=fake_apt([], fail_at="apt-get"))
    assert not corpus_dir("python-docs").exists()
    assert list((cache / "corpora").iterdir()) == []  # the temporary directory is gone too


def test_the_installed_package_is_used_first_and_errors_say_how_to_install(tmp_path):
    system = tmp_path / "root"
    (system / SOURCES).mkdir(parents=True)
    (system / SOURCES / "a.rst.txt").write_text("text")
    assert corpus_files("python-docs", system_root=system) == [system / SOURCES / "a.rst.txt"]
    with pytest.raises(CorpusError, match="mechscope corpus install python-docs"):
        corpus_files("python-docs", system_root=tmp_path / "empty")
    with pytest.raises(CorpusError, match="unknown corpus 'wiki'; known: python-docs"):
        corpus_files("wiki")


def test_missing_package_tools_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda tool: None)
    with pytest.raises(CorpusError, match="needs apt-get"):
        install_corpus("python-docs", run=fake_apt([]))


def test_the_command_says_how_to_install_then_prints_the_path(capsys, monkeypatch):
    corpus = corpora.CORPORA["python-docs"]  # as if Debian's package were not installed here
    monkeypatch.setitem(corpora.CORPORA, "python-docs", replace(corpus, sources="no/such/dir"))
    assert main(["corpus", "path", "python-docs"]) == 2
    assert "run `mechscope corpus install python-docs`" in capsys.readouterr().err
    monkeypatch.setattr(corpora.subprocess, "run", fake_apt([]))
    assert main(["corpus", "install", "python-docs"]) == 0
    assert "python-docs  (2 files" in capsys.readouterr().out


def test_a_corpus_name_resolves_to_its_files_and_a_path_stays_a_path(cache, tmp_path):
    from mechscope.core.corpora import resolve_corpus

    install_corpus("python-docs", run=fake_apt([]))
    assert resolve_corpus("python-docs") == corpus_files("python-docs")
    here = tmp_path / "mine.txt"
    here.write_text("text")
    assert resolve_corpus(here) == here and resolve_corpus("missing.txt") == Path("missing.txt")
