"""Caching the residual stream and activation patching: mechscope against raw hooks,
TransformerLens and nnsight, all on the same GPT-2-shaped random weights.

One Hugging Face ``GPT2LMHeadModel`` (random, seed 0, eager attention) is the model for
everyone: mechscope, raw ``register_forward_hook`` and nnsight run it directly;
TransformerLens 4 wraps a copy of it (``TransformerBridge.boot_transformers(...,
hf_model=...)``: its logits equal the model's bit for bit, checked).

1. Caching: the residual stream after each of the 12 blocks, with the full logits, of a
   GPT-2-small-shaped model (batch 2 x 128), in multiples of a plain forward of the model
   timed in the same alternation.
2. Patching: every residual (layer, position) cell (``resid_pre``) of a smaller GPT-2-shaped
   model, clean into corrupt, metric the answer's logit at the last position:
   ``patch_cells`` against TransformerLens's own loop (``patching.get_act_patch_resid_pre``
   after ``run_with_cache`` of the clean run). Both values must agree (<= 1e-4).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from importlib.metadata import version

import torch
import transformers as tf
from _rows import fix_threads, interleaved, row
from nnsight import NNsight
from transformer_lens import patching
from transformer_lens.model_bridge import TransformerBridge

from mechscope.circuits.cells import resid_cells
from mechscope.circuits.patching import patch_cells
from mechscope.core.run import run
from mechscope.core.site import Site


def gpt2(n_layer: int, n_embd: int, n_head: int, n_ctx: int) -> tf.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_ctx)
    cfg._attn_implementation = "eager"  # TransformerLens forces eager attention; everyone runs the same kernels
    return tf.GPT2LMHeadModel(cfg).eval()


def bridge(model: tf.GPT2LMHeadModel) -> TransformerBridge:
    """TransformerLens on a copy of ``model`` (same weights): the bridge swaps the modules
    it wraps for its own in place, which would slow down everyone else's runs of ``model``."""
    model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as d:  # the config from disk: no Hub access, the weights are hf_model's
        model.config.save_pretrained(d)
        tl = TransformerBridge.boot_transformers(d, hf_model=model, tokenizer=None)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        gap = float((tl(ids) - model(ids).logits).abs().max())
    if gap > 0:
        raise SystemExit(f"TransformerLens's bridge changed the model's logits (max |diff| {gap:.1e})")
    return tl


def caching(quick: bool) -> None:
    model = gpt2(12, 768, 12, 128)
    tl = bridge(model)
    blocks = [model.transformer.h[i] for i in range(12)]
    sites = [Site(f"transformer.h.{i}") for i in range(12)]
    names = {f"blocks.{i}.hook_resid_post" for i in range(12)}
    traced = NNsight(model)
    ids = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(1))

    def hooks():
        store, handles = [], [b.register_forward_hook(lambda m, i, o: store.append(o[0] if isinstance(o, tuple) else o))
                              for b in blocks]
        try:
            return model(ids).logits, store
        finally:
            for h in handles:
                h.remove()

    def nnsight():
        saved: list = []  # filled inside the trace (nnsight runs the block's code itself, not in this frame)
        with traced.trace(ids):
            for i in range(12):
                saved.append(traced.transformer.h[i].output.save())
            saved.append(traced.output.save())
        return saved

    fns = {"plain": lambda: model(ids), "mechscope": lambda: run(model, ids, cache=sites),
           "hooks": hooks, "nnsight": nnsight,
           "tl": lambda: tl.run_with_cache(ids, names_filter=lambda n: n in names)}
    with torch.no_grad():
        _, acts = run(model, ids, cache=sites)
        _, tl_cache = fns["tl"]()
        gap = max(float((acts[s] - tl_cache[f"blocks.{i}.hook_resid_post"]).abs().max()) for i, s in enumerate(sites))
        t = interleaved(fns, repeats=3 if quick else 11)  # a gap of 1-2 % needs many rounds to show
    x = {k: v / t["plain"] for k, v in t.items()}
    work = "cache resid after 12 blocks + logits (GPT-2-small shape, 2x128), x a forward"
    print(f"  plain forward {t['plain'] * 1e3:.0f} ms; mechscope's cache equals TransformerLens's to {gap:.1e}")
    row(work, "raw hooks", x["hooks"], x["mechscope"], "x forward")
    row(work, f"TransformerLens {version('transformer-lens')} run_with_cache", x["tl"], x["mechscope"], "x forward")
    row(work, f"nnsight {version('nnsight')}", x["nnsight"], x["mechscope"], "x forward")


def patching_loop(quick: bool) -> bool:
    n_layer, pos, batch = 4, 16 if quick else 32, 8
    model = gpt2(n_layer, 256, 4, 64)
    tl = bridge(model)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(0, 50257, (batch, pos), generator=gen) for _ in range(2))
    answer = torch.randint(0, 50257, (batch,), generator=gen)
    metric = lambda logits: logits[:, -1].gather(1, answer[:, None]).mean()  # noqa: E731 - [b, any, vocab] -> scalar
    cells = resid_cells(model, positions=range(pos))

    def tl_loop():
        _, clean_cache = tl.run_with_cache(clean)
        return patching.get_act_patch_resid_pre(tl, corrupt, clean_cache, metric)

    with torch.no_grad():
        ours = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
        theirs = tl_loop()
        gap = float((ours.values - theirs.flatten().double()).abs().max())
        t = interleaved({"forward": lambda: model(corrupt), "mechscope": lambda: patch_cells(
            model, clean, corrupt, cells, metric, readout=[-1]), "tl": tl_loop}, repeats=2 if quick else 3, warmup=0)
    per_cell = {k: t[k] / t["forward"] / len(cells) for k in ("mechscope", "tl")}
    print(f"  {len(cells)} cells; one forward {t['forward'] * 1e3:.1f} ms; values agree to {gap:.1e}; "
          f"mechscope's paths {ours.extra.get('paths')}")
    row(f"patch all resid cells (GPT-2 shape, {n_layer} layers d 256, {batch}x{pos}), forwards/cell",
        f"TransformerLens {version('transformer-lens')} loop", per_cell["tl"], per_cell["mechscope"], "forwards/cell",
        f"values agree to {gap:.0e}")
    return gap <= 1e-4


def main() -> int:
    threads = fix_threads()
    print(f"== caching and patching, mechscope vs raw hooks / TransformerLens / nnsight "
          f"(torch {torch.__version__}, transformers {tf.__version__}, threads={threads})")
    quick = "--quick" in sys.argv
    caching(quick)
    return 0 if patching_loop(quick) else 1


if __name__ == "__main__":
    sys.exit(main())
