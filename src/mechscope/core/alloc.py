"""Keep freed memory for reuse in a training process (glibc's allocator, CPU).

A training step on CPU allocates and frees the same large activations every step. By
default glibc hands much of that memory back to the operating system when it is freed
(large blocks are mapped and unmapped one by one; the top of the heap is trimmed beyond
a threshold), so the next step touches fresh pages again and pays a page fault per 4 KiB,
a sizeable share of a step on this project's machines (measured: ``docs/results.md``).

:func:`retain_freed_memory` serves blocks up to 32 MiB from the heap (the ceiling of
glibc's own sliding threshold), never trims it below 2 GiB of free space and grows it 256 MiB
at a time: the process keeps its high-water mark of memory instead of handing it back
between steps. It changes the whole process, so the library never calls it: the
``mechscope`` command does, at start, and a user's own training script may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
SETTINGS = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 * 2**20}


def retain_freed_memory(settings: dict[int, int] | None = None) -> bool:
    """Set glibc's ``mallopt`` as described above (``settings``: parameter -> value, default
    :data:`SETTINGS`); False where there is no glibc or it refuses a value."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # a list, not a generator: every value is set even after one is refused
    return all([mallopt(param, value) == 1 for param, value in (settings or SETTINGS).items()])
