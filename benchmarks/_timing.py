"""Timing helpers shared by the benchmarks: interleaved repeats, medians, fixed threads.

Two contenders are timed in alternation (A B A B ...) so that drift of a noisy shared
machine hits both alike; ratios are of medians.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def fix_threads(default: int = 1) -> int:
    """Fix torch's thread count (``MECHSCOPE_THREADS`` overrides) and return it.

    On 2 shared cores two threads can run several times slower than one, so the
    benchmarks never leave this to chance.
    """
    n = int(os.environ.get("MECHSCOPE_THREADS", default))
    torch.set_num_threads(n)
    return n


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def header(title: str, threads: int) -> None:
    print(f"== {title}  (torch {torch.__version__}, threads={threads})")
