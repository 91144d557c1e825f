"""Import time: mechscope against ``import <peer>`` for the peers of this environment.

``import mechscope`` alone is lazy (it loads no torch: a few ms); every peer's import loads
torch. So the row's mechscope figure is ``from mechscope import run, cache`` (torch and the
core), and the bare ``import mechscope`` and ``import torch`` are printed beside it.

Each import runs in a fresh interpreter (``python -c``; the interpreter's own start-up is
not counted, torch's import is, for everyone), alternating mechscope and the peers, with
the operating system's file cache warm (one untimed import of each first). Medians.
Usage: ``python import_time.py MODULE=LABEL=DISTRIBUTION ...`` (the label is shown with the
distribution's installed version).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from importlib.metadata import version

from _rows import row

PROBE = "import time; t = time.perf_counter(); {m}; print(time.perf_counter() - t)"
OURS = "from mechscope import run, cache"


def seconds(module: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(m=module if " " in module else f"import {module}")], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    peers = {}
    for arg in (a for a in sys.argv[1:] if not a.startswith("--")):
        module, label, dist = arg.split("=")
        peers[module] = f"{label} {version(dist)}"
    repeats = 3 if "--quick" in sys.argv else 5
    modules = [OURS, "mechscope", "torch", *peers]
    times: dict[str, list[float]] = {m: [] for m in modules}
    for m in modules:
        seconds(m)  # warm the file cache
    for _ in range(repeats):
        for m in modules:
            times[m].append(seconds(m))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"== import time (medians of {repeats}, fresh interpreters, alternating)")
    for m, label in peers.items():
        row("import, fresh interpreter", label, med[m], med[OURS], "s",
            f"mechscope: `{OURS}`; bare import mechscope {med['mechscope'] * 1e3:.0f} ms; "
            f"torch alone {med['torch']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
