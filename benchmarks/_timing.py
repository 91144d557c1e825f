"""Timing helpers shared by the benchmarks: interleaved repeats, medians, fixed threads.

Two contenders are timed in alternation (A B A B ...) so that drift of a noisy shared
machine hits both alike; ratios are of medians.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, NoReturn, Sequence

import torch


def fix_threads(default: int = 1) -> int:
    """Fix torch's thread count (``MECHSCOPE_THREADS`` overrides) and return it.

    On 2 shared cores two threads can run several times slower than one, so the
    benchmarks never leave this to chance.
    """
    n = int(os.environ.get("MECHSCOPE_THREADS", default))
    torch.set_num_threads(n)
    return n


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1,
                sync: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation. ``sync`` waits for
    queued device work (:func:`synchronize`), so that a GPU's time is counted where it is spent."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def device_options(argv: Sequence[str]) -> tuple[torch.device, torch.dtype]:
    """A benchmark's ``--device`` (cpu, cuda, cuda:N or auto; default cpu) and ``--dtype`` (float32,
    bfloat16, float16; default float32), checked as ``load_model`` checks them. A value that
    cannot run here exits with status 2 and one line saying why."""
    from mechscope.core.load import ModelLoadError, in_memory_device, torch_dtype

    def value(flag: str, default: str) -> str:
        if flag not in argv:
            return default
        i = list(argv).index(flag)
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            _refuse(f"{flag} needs a value, e.g. {flag} {default}")
        return argv[i + 1]

    name, dtype = value("--device", "cpu"), value("--dtype", "float32")
    try:
        dt = torch_dtype(dtype)
        device = torch.device(in_memory_device(name))
    except ModelLoadError as e:
        _refuse(f"--device {name} --dtype {dtype}: {e}")
    if device.type not in ("cpu", "cuda"):
        _refuse(f"--device {name}: these benchmarks time the CPU and CUDA devices only")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        _refuse(f"--device {name}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device, dt


def placed(device: torch.device, dtype: torch.dtype) -> str:
    """``"bfloat16 on cuda:0"``; the dtype alone on the CPU."""
    return str(dtype).removeprefix("torch.") + ("" if device.type == "cpu" else f" on {device}")


def _refuse(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def synchronize(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def header(title: str, threads: int) -> None:
    print(f"== {title}  (torch {torch.__version__}, threads={threads})")
