"""What every peer script shares: fixed threads, interleaved medians, and the rows it emits.

A row is one line of JSON on stdout, ``ROW {...}``, read back by ``run.py``: the work, the
peer, both times (or rates), the ratio (how many times faster mechscope is: the peer's
seconds over ours) and the 1-minute load average when the row was measured.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/_timing.py

from _timing import fix_threads, interleaved

__all__ = ["fix_threads", "interleaved", "load", "row"]


def load() -> float:
    return os.getloadavg()[0]


def row(work: str, peer: str, peer_s: float, ours_s: float, unit: str = "s", note: str = "") -> None:
    """Emit one row; ``peer_s`` and ``ours_s`` are seconds per unit of the same work."""
    rec = {"work": work, "peer": peer, "peer_s": peer_s, "mechscope_s": ours_s, "ratio": peer_s / ours_s,
           "unit": unit, "load": load(), "note": note}
    print("ROW " + json.dumps(rec), flush=True)
    print(f"  {work}: {peer} {fmt(peer_s, unit)}, mechscope {fmt(ours_s, unit)}, {rec['ratio']:.2f}x "
          f"(load average {rec['load']:.2f}){' ' + note if note else ''}", flush=True)


def fmt(seconds: float, unit: str) -> str:
    if unit == "steps/s":
        return f"{1 / seconds:.1f} steps/s"
    if unit == "x forward":
        return f"{seconds:.3f}x a forward"
    if unit == "forwards/cell":
        return f"{seconds:.3f} forwards/cell"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
