"""Cost of hooked runs: caching the residual stream, and the fixed cost of a run.

1. Cache the residual stream after every block of a GPT-2-small-shaped random model
   (12 layers, d_model 768, batch 8 x 128, fp32) vs a plain forward. Target <= 1.03x.
   (Measured elsewhere on a machine like this: plain hooks / nnsight 0.99x,
   TransformerLens run_with_cache 1.05x, 1.42x with no names filter.)
2. Fixed cost of a hooked run on a tiny model (one cached site), in ms above a plain
   forward. Target < 0.2 ms (nnsight adds ~0.1 ms, TransformerLens 0.5-0.7 ms).

Run: ``make bench-perf`` or ``.venv/bin/python benchmarks/bench_hooks.py [--quick]``.
"""

from __future__ import annotations

import sys

import torch

from _timing import fix_threads, header, interleaved, verdict
from mechscope.core.run import run
from mechscope.core.site import Site
from mechscope.zoo import build


def gpt2_small_shape():
    """A random GPT-2-small-shaped model: Hugging Face GPT-2 when installed, else ours."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        model = build("gpt2_small_shape", n_ctx=128)
        return model, [Site(f"blocks.{i}") for i in range(12)], "mechscope.zoo transformer"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=128)).eval()
    return model, [Site(f"transformer.h.{i}") for i in range(12)], "transformers GPT2LMHeadModel"


def cache_overhead(quick: bool) -> bool:
    model, sites, kind = gpt2_small_shape()
    batch = 2 if quick else 8
    ids = torch.randint(0, 50257, (batch, 128))
    with torch.no_grad():
        plain = lambda: model(ids)  # noqa: E731
        cached = lambda: run(model, ids, cache=sites)  # noqa: E731
        t = interleaved({"plain": plain, "cache": cached}, repeats=5 if quick else 9)
    ratio = t["cache"] / t["plain"]
    ok = ratio <= 1.03
    print(f"cache resid after all 12 blocks ({kind}, batch {batch}x128): plain {t['plain'] * 1e3:.0f} ms, "
          f"cached {t['cache'] * 1e3:.0f} ms, ratio {ratio:.3f} (target <= 1.03) {verdict(ok)}")
    return ok


def fixed_cost() -> bool:
    model = build("mlp")
    x = torch.randn(4, 16)
    site = Site("acts.0")
    with torch.no_grad():
        t = interleaved({"plain": lambda: model(x), "hooked": lambda: run(model, x, cache=[site])}, repeats=15, inner=500)
    extra_ms = (t["hooked"] - t["plain"]) * 1e3
    ok = extra_ms < 0.2
    print(f"fixed cost of a hooked run (MLP 16-16-16-16-2, one cached site): plain {t['plain'] * 1e6:.1f} us, "
          f"hooked {t['hooked'] * 1e6:.1f} us, extra {extra_ms:.3f} ms (target < 0.2 ms) {verdict(ok)}")
    return ok


def main() -> int:
    threads = fix_threads()
    header("hooked runs", threads)
    ok = fixed_cost()
    ok = cache_overhead("--quick" in sys.argv) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
