"""``make bench-peers``: run each peer benchmark in its group's environment and print one table.

Every row is measured in one process that times mechscope and the peer in alternation
(medians, torch threads fixed to 1), on the same weights and data; the ratio is how many
times faster mechscope is (the peer's time over ours; below 1: the peer is faster). The
table also goes to ``peers-out/peers.md`` (Markdown) and ``peers-out/rows.jsonl``.

Usage: ``python benchmarks/peers/run.py [--peers DIR] [--out DIR] [--quick] [GROUP ...]``
(groups: pyvene, tl, sae; default all; the environments are made by ``install.sh``).
Standard library only: it runs under any Python.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# group -> the scripts it runs, each with its arguments
GROUPS = {
    "pyvene": [["das_pyvene.py"], ["import_time.py", "pyvene=pyvene=pyvene"]],
    "tl": [["hooks_tl_nnsight.py"], ["import_time.py", "transformer_lens=TransformerLens=transformer-lens",
                                     "nnsight=nnsight=nnsight"]],
    "sae": [["sae_saelens_sparsify.py"], ["import_time.py", "sae_lens=SAELens=sae-lens",
                                          "sparsify=sparsify=eai-sparsify"]],
}
ORDER = ("DAS", "cache", "patch", "TopK", "import")  # the table's order of works
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MECHSCOPE_THREADS": "1", "TQDM_DISABLE": "1",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def arg(flag: str, default: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def run_group(group: str, python: Path, quick: bool) -> tuple[list[dict], list[str]]:
    rows, failed = [], []
    for script, *args in GROUPS[group]:
        cmd = [str(python), str(HERE / script), *args, *(["--quick"] if quick else [])]
        print(f"== [{group}] {script} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **ENV})
        for line in proc.stdout:
            if line.startswith("ROW "):
                rows.append({**json.loads(line[4:]), "group": group})
            else:
                print("   " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            failed.append(f"{group}/{script} (exit {proc.returncode})")
        print(f"   [{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows, failed


def value(seconds: float, unit: str) -> str:
    if unit == "steps/s":
        return f"{1 / seconds:.1f} steps/s"
    if unit == "x forward":
        return f"{seconds:.3f}x a forward"
    if unit == "forwards/cell":
        return f"{seconds:.3f} fwd/cell"
    return f"{seconds * 1e3:.0f} ms" if seconds < 0.9995 else f"{seconds:.2f} s"


def machine() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), no GPU used, torch threads 1"


def installs(peers: Path, groups: list[str]) -> str:
    """How long each environment took to install, as ``install.sh`` recorded it."""
    done = {g: (peers / g / ".install-seconds").read_text().strip() for g in groups
            if (peers / g / ".install-seconds").exists()}
    return ", ".join(f"{g} {s} s" for g, s in done.items()) or "not recorded"


def table(rows: list[dict], started: str, seconds: float, installed: str) -> str:
    lines = [(f"Measured {started} on {machine()}; {seconds / 60:.0f} min of benchmarks (installing the "
              f"environments took: {installed}). Ratio: the peer's time over mechscope's, timed in alternation in "
              f"one process (above 1: mechscope is faster)."), "",
             "| work | peer | peer | mechscope | ratio | load average |", "|---|---|---|---|---|---|"]
    rank = lambda r: next((i for i, p in enumerate(ORDER) if r["work"].startswith(p)), len(ORDER))  # noqa: E731
    for r in sorted(rows, key=rank):
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['work']}{note} | {r['peer']} | {value(r['peer_s'], r['unit'])} | "
                     f"{value(r['mechscope_s'], r['unit'])} | {r['ratio']:.2f}x | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    peers, out, quick = Path(arg("--peers", ".peers")), Path(arg("--out", "peers-out")), "--quick" in sys.argv
    groups = [g for g in sys.argv[1:] if g in GROUPS] or list(GROUPS)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0, rows, failed = time.perf_counter(), [], []
    for group in groups:
        python = peers / group / "bin" / "python"
        if not python.exists():
            failed.append(f"{group} (no environment at {python}: run benchmarks/peers/install.sh)")
            continue
        got, bad = run_group(group, python, quick)
        rows += got
        failed += bad
    text = table(rows, started, time.perf_counter() - t0, installs(peers, groups))
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(text)
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n" + text)
    print(f"written to {out / 'peers.md'}")
    if failed:
        print("failed: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
