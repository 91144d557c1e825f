"""Dictionaries on a pretrained model's activations over text, with no store: ``sae train
--model M --corpus C --site S`` trains on the rows cache() gives over the same windows (BOS
left out), records the model and the text it read, and ``sae eval`` scores FVU, L0, dead
fraction and CE loss recovered on held-out windows, refusing to score training text."""

import json

import pytest
import torch

from mechscope.cli import main
from mechscope.core.load import load_model
from mechscope.core.models import resolve
from mechscope.core.run import cache
from mechscope.core.text import analysis_mask, text_windows, window_batches
from mechscope.sae.arch import SAE, SAEConfig, SAEError
from mechscope.sae.evals import evaluate
from mechscope.sae.io import read_sae_metadata
from mechscope.sae.text_data import TextActivations, TextSource, evaluate_on_text, held_out_skip

SITE = "resid_post.0"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(body_corpus):
    return body_corpus


def cached_rows(model, tok, site, windows, keep_bos=False):
    """What the rows must be: cache() over the windows, with analysis_mask applied."""
    out = []
    with torch.no_grad():
        for batch in window_batches(iter(windows), 3):
            out.append(cache(model, batch, [site])[site][analysis_mask(batch, tok.bos_token_id, keep_bos)])
    return torch.cat(out)


def sorted_rows(x):
    return x[torch.argsort(x[:, 0])]


def test_live_rows_are_cache_rows_without_bos_and_windows_are_counted(model_dir, corpus):
    model, tok = load_model(str(model_dir))
    site = resolve(model, SITE)
    text = TextSource(corpus, seq_len=16, field="body")
    windows = list(text_windows(corpus, tok, 16, field="body", max_windows=6))
    want = cached_rows(model, tok, site, windows)  # [6 * 15, d]
    live = TextActivations(model, tok, site, text, batch_size=10, batch_windows=3, buffer_rows=10_000)
    got = []
    for rows in live:
        got.append(rows)
        if sum(r.shape[0] for r in got) >= 90:
            break
    assert want.shape[0] == 90
    # the buffer fills past 90 rows before serving: compare the first 90 served with all rows of the windows read
    all_read = cached_rows(model, tok, site, list(text_windows(corpus, tok, 16, field="body",
                                                                max_windows=live.windows_read)))
    served = torch.cat(got)[:90]
    assert all(bool((all_read == r).all(1).any()) for r in served)  # every served row is a non-BOS cache row
    bos_rows = cache(model, {"input_ids": torch.stack(windows[:1])}, [site])[site][:, 0]
    assert not bool((served == bos_rows).all(1).any())
    assert live.record()["windows_read"] == live.windows_read >= 6


def test_held_out_skip_converts_through_tokens_and_refuses_training_text(corpus, tmp_path):
    text = TextSource(corpus, seq_len=16, field="body")
    trained = TextSource(corpus, seq_len=31, field="body", shuffle_buffer=4).record(10)  # 14 windows of 30 tokens
    assert trained["corpus_windows_touched"] == 14
    assert held_out_skip(trained, text, None) == 28  # 420 corpus tokens / 15 per window
    assert held_out_skip(trained, text, 40) == 40
    with pytest.raises(SAEError, match="--skip-windows 28 or more"):
        held_out_skip(trained, text, 27)
    other = tmp_path / "other.txt"
    other.write_text("some other text")
    assert held_out_skip(trained, TextSource(other, seq_len=16), None) == 0  # another corpus: nothing to skip
    assert held_out_skip(None, text, 5) == 5


def test_evaluate_on_text_matches_evaluate_on_cache_rows(model_dir, corpus):
    model, tok = load_model(str(model_dir))
    site = resolve(model, SITE)
    d = int(cache(model, {"input_ids": torch.tensor([[1, 2]])}, [site])[site].shape[-1])
    sae = SAE(SAEConfig(d_in=d, d_sae=16, arch="topk", k=3))
    text = TextSource(corpus, seq_len=16, field="body")
    result = evaluate_on_text(sae, model, tok, site, text, windows=4, skip_windows=2, batch_windows=3)
    held = list(text_windows(corpus, tok, 16, field="body", max_windows=6))[2:]
    want = evaluate(sae, [cached_rows(model, tok, site, held)])
    assert result["n_tokens"] == 4 * 15 and result["windows"] == 4 and result["skip_windows"] == 2
    assert result["fvu"] == pytest.approx(want["fvu"]) and result["l0"] == pytest.approx(want["l0"])
    assert {"dead_fraction", "ce_loss_recovered", "ce_clean", "ce_spliced"} <= set(result)
    assert "excluded" in result["positions"]
    with pytest.raises(SAEError, match="no held-out window"):
        evaluate_on_text(sae, model, tok, site, text, windows=4, skip_windows=10_000)


def test_cli_train_live_records_model_and_text_and_eval_holds_out(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "sae.safetensors"
    common = ["--model", str(model_dir), "--corpus", str(corpus), "--field", "body", "--site", SITE,
              "--seq-len", "16", "--batch-windows", "3"]
    assert main(["sae", "train", *common, "--d-sae", "16", "--k", "2", "--steps", "3", "--batch-size", "32",
                 "--buffer-rows", "64", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    meta = read_sae_metadata(out)
    assert meta["model"]["model_sha256"] and meta["model"]["dtype"] == "float32"
    touched = meta["text"]["corpus_windows_touched"]
    assert meta["text"]["corpus"]["field"] == "body" and meta["text"]["keep_bos"] is False
    assert 96 // 15 <= touched <= 15  # 3 steps of 32 rows through a buffer of 64: a few windows, not the corpus
    capsys.readouterr()
    assert main(["sae", "eval", *common, "--sae", str(out), "--windows", "3", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skip_windows"] == touched and result["windows"] == 3  # after the training text by default
    assert 0 <= result["dead_fraction"] <= 1 and "ce_loss_recovered" in result and result["n_tokens"] == 45
    assert main(["sae", "eval", *common, "--sae", str(out), "--skip-windows", "0"]) == 2
    assert "--skip-windows" in capsys.readouterr().err


def test_cli_live_bad_input_is_a_usage_error(tmp_path, model_dir, corpus, capsys):
    out = str(tmp_path / "sae.safetensors")
    base = ["sae", "train", "--d-sae", "16", "--k", "2", "--steps", "2", "--out", out]
    assert main(base + ["--corpus", str(corpus), "--site", SITE]) == 2  # no --model
    assert "--corpus needs --model" in capsys.readouterr().err
    assert main(base + ["--model", str(model_dir), "--corpus", str(corpus)]) == 2  # no --site
    assert "needs --site" in capsys.readouterr().err
    assert main(base + ["--model", str(model_dir), "--corpus", str(corpus), "--field", "body", "--site", SITE,
                        "--kind", "transcoder"]) == 2
    assert "store" in capsys.readouterr().err


def test_cli_live_resume_refuses_other_text_or_model(tmp_path, model_dir, corpus, texts, capsys):
    """The checkpoint's fingerprint holds the corpus files and the model's weights: a resume on
    other text, another seq-len or another model is refused, naming the option."""
    ck = tmp_path / "ck"
    common = ["sae", "train", "--model", str(model_dir), "--field", "body", "--site", SITE, "--batch-windows", "3",
              "--d-sae", "16", "--k", "2", "--steps", "2", "--batch-size", "32", "--buffer-rows", "64",
              "--checkpoint-dir", str(ck), "--out", str(tmp_path / "sae.safetensors"), "--no-progress"]
    assert main(common + ["--corpus", str(corpus), "--seq-len", "16"]) == 0
    capsys.readouterr()
    assert main(common + ["--corpus", str(corpus), "--seq-len", "12"]) == 2
    assert "was trained with --seq-len 16, not 12" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:40]))
    assert main(common + ["--corpus", str(other), "--seq-len", "16"]) == 2
    assert "--corpus" in capsys.readouterr().err
