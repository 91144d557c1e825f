"""Cost of patching every (layer, position) cell of the residual stream.

Side by side in one run, on a 4-layer transformer (the zoo's, d_model 128, 8 heads,
d_mlp 512, vocab 2048) at 32 positions, batch 8 prompt pairs, metric = logit of the
answer at the last position:

1. one forward per cell (what per-cell patching tools do; TransformerLens measures 0.98
   of its own forward per cell here),
2. batched activation patching (several cells per forward; a residual-stream cell at
   position p replays only positions >= p of the blocks after it, from the base run's
   keys and values, and the last block and unembedding at the read position only).
   Target: at most 0.25 of a forward per cell, i.e. at least 4x faster than (1).
3. attribution patching of all cells (one forward on each input, one backward; the
   metric reads the last position, so the last block's queries and MLP and the
   unembedding run there only). Target: at most 3.5 forwards in total.

Times are medians of interleaved repeats, in units of one plain forward of the batch.
Run: ``make bench-perf`` or ``.venv/bin/python benchmarks/bench_circuits.py [--quick]``.
"""

from __future__ import annotations

import sys

import torch

from _timing import fix_threads, header, interleaved, verdict
from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import resid_cells
from mechscope.circuits.patching import patch_cells, patch_one_by_one
from mechscope.zoo import build

LAYERS, POS, BATCH, VOCAB = 4, 32, 8, 2048


def main() -> int:
    threads = fix_threads()
    header("circuit patching", threads)
    quick = "--quick" in sys.argv
    model = build("transformer", seed=0, n_layers=LAYERS, d_model=128, n_heads=8, d_head=16, d_mlp=512,
                  vocab=VOCAB, n_ctx=POS)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, VOCAB, (BATCH, POS), generator=gen)
    corrupt = torch.randint(0, VOCAB, (BATCH, POS), generator=gen)
    answer = torch.randint(0, VOCAB, (BATCH,), generator=gen)

    def metric(logits):  # logits at the readout position [batch, 1, vocab]
        return logits[:, -1].gather(1, answer[:, None]).mean()

    cells = resid_cells(model, positions=range(POS))  # 4 x 32 = 128 cells
    n = len(cells)

    def forwards():  # one sample = 10 forwards: a single ~10 ms call is too short to time on a busy machine
        for _ in range(10):
            model(corrupt)
    with torch.no_grad():
        t = interleaved({
            "forward": forwards,
            "one_per_cell": lambda: patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1]),
            "batched": lambda: patch_cells(model, clean, corrupt, cells, metric, readout=[-1]),
        }, repeats=2 if quick else 5)
    with torch.no_grad():  # attribution is timed beside forwards of its own (its grad is enabled inside)
        ta = interleaved({"forward": forwards, "attribution": lambda: attribution_patching(
            model, clean, corrupt, cells, metric, readout=[-1])}, repeats=3 if quick else 7)
    fwd = t["forward"] / 10
    per_cell_one, per_cell_batched = t["one_per_cell"] / fwd / n, t["batched"] / fwd / n
    speedup, attr = t["one_per_cell"] / t["batched"], ta["attribution"] / (ta["forward"] / 10)
    ok_batched, ok_attr = per_cell_batched <= 0.25 and speedup >= 4.0, attr <= 3.5
    print(f"{n} cells (resid_pre x position), batch {BATCH}x{POS}; one forward = {fwd * 1e3:.1f} ms")
    print(f"  one forward per cell : {per_cell_one:.3f} forwards/cell ({t['one_per_cell']:.2f} s)")
    print(f"  batched patching     : {per_cell_batched:.3f} forwards/cell ({t['batched']:.2f} s), "
          f"{speedup:.1f}x faster (target <= 0.25 forwards/cell, >= 4x) {verdict(ok_batched)}")
    print(f"  attribution patching : {attr:.2f} forwards in total for all {n} cells (target <= 3.5) {verdict(ok_attr)}")
    return 0 if ok_batched and ok_attr else 1


if __name__ == "__main__":
    sys.exit(main())
