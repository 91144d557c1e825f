"""The allocator setting of the ``mechscope`` command (glibc's mallopt).

Its effect (fewer page faults, a faster step) is measured in benchmarks/bench_spd.py, not
here: how many faults a process takes depends on the machine's memory management.
"""

import platform
import subprocess
import sys

import pytest

from mechscope.core import alloc

GLIBC = platform.libc_ver()[0] == "glibc"


def _child(call: str) -> str:
    # in a child process: the setting is process-wide and would outlive the test here
    code = f"from mechscope.core import alloc; print({call})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_glibc_accepts_the_settings():
    assert _child("alloc.retain_freed_memory()") == "True"


def test_the_command_sets_it_and_main_does_not(monkeypatch):
    import mechscope.cli as cli

    calls = []
    monkeypatch.setattr(alloc, "retain_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["--version"]) == 0 and calls == []  # tests and scripts call main in-process
    monkeypatch.setattr(sys, "argv", ["mechscope", "--version"])
    assert cli.console() == 0 and calls == [1]
