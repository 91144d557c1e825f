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


def test_the_settings_are_the_documented_ones_and_nothing_is_set_on_import():
    assert alloc.SETTINGS == {alloc.M_MMAP_THRESHOLD: 32 * 2**20, alloc.M_TRIM_THRESHOLD: 2**31 - 1,
                              alloc.M_TOP_PAD: 256 * 2**20}
    import mechscope.cli as cli

    assert cli.console is not cli.main  # the command sets it; main(), called in-process, does not
