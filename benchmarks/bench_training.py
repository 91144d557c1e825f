"""Training speed of the toy worlds' recipes, on this machine's threads.

1. Grokking, p = 113 (the paper's recipe, full batch): seconds until the test accuracy
   first reaches 0.999 (checked every 100 steps). Target: <= 10 minutes on 2 CPU cores.
2. Induction heads, 2-layer attention-only model: seconds until the phase change (the
   repeated-half loss first falls below ln(V)/2). Target: <= 2 minutes.

Steps per second are printed for both. ``--quick`` runs the p = 53 grokking variant
(no target; a smoke run). Run: ``make bench-perf`` or
``.venv/bin/python benchmarks/bench_training.py [--quick]``.
"""

from __future__ import annotations

import sys

from _timing import fix_threads, header, verdict
from mechscope.tasks import grokking, induction


def grokking_speed(quick: bool) -> bool:
    cfg = grokking.quick_config() if quick else grokking.GrokkingConfig()
    _, hist = grokking.train_grokking(cfg, stop_at_accuracy=0.999)
    secs = hist["grokked_seconds"]
    ok = quick or (secs is not None and secs <= 600)
    when = f"step {hist['grokked_step']} after {secs:.0f} s" if secs is not None else f"never in {cfg.steps} steps"
    print(f"grokking p={cfg.p}: {hist['steps_per_second']:.1f} steps/s; test accuracy >= 0.999 at {when} "
          f"(target <= 600 s{'; quick run, no target' if quick else ''}) {verdict(ok)}")
    return ok


def induction_speed() -> bool:
    cfg = induction.InductionConfig(steps=1500)
    _, hist = induction.train_induction(cfg)
    secs = hist["phase_change_seconds"]
    ok = secs is not None and secs <= 120
    when = f"step {hist['phase_change_step']} after {secs:.0f} s" if secs is not None else f"not within {cfg.steps} steps"
    print(f"induction 2-layer: {hist['steps_per_second']:.1f} steps/s; phase change at {when} (target <= 120 s) {verdict(ok)}")
    return ok


def main() -> int:
    threads = fix_threads()
    header("training the toy worlds", threads)
    ok = induction_speed()
    ok = grokking_speed("--quick" in sys.argv) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
