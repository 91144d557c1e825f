"""``mechscope probe`` on a built-in model and on a random Hugging Face causal LM."""

import json

import pytest

from mechscope.cli import main


def test_probe_on_the_steering_toy(capsys):
    assert main(["probe", "--data", "steering_toy", "--site", "resid_post.1", "--n", "300", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] > 0.95 and report["rows"] == 300 and report["width"] == 64
    assert report["selectivity"] is not None and report["shuffled_accuracy"] < 0.7


def test_probe_on_a_hugging_face_model_from_jsonl(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4, "vocab_size": 40, "n_positions": 16,
           "bos_token_id": 0, "eos_token_id": 0}
    rows = [{"tokens": [1 + i % 7, 2, 3 + (i * 5) % 30][: 2 + i % 2], "label": int((1 + i % 7) > 4)}
            for i in range(120)]
    for r in rows:  # the label is readable from the first token, which the last position attends to
        r["tokens"] = [r["tokens"][0]] * 3 + r["tokens"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["probe", "--hf-config", json.dumps(cfg), "--data", str(path), "--site", "resid_post.0",
                 "--mdl", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 120 and "mdl" in report and report["mdl"]["uniform_bits"] == 120.0


def test_bad_inputs_are_usage_errors(tmp_path, capsys):
    assert main(["probe", "--site", "resid_post.9", "--n", "50"]) == 2
    assert "cannot use site" in capsys.readouterr().err
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"tokens": [1, 2], "label": 0}) for _ in range(30)))
    assert main(["probe", "--data", str(path), "--site", "resid_post.0"]) == 2
    assert "single class" in capsys.readouterr().err


def test_probe_on_the_othello_world_model(capsys):
    # more rows than activations() runs at once (256): the per-example positions must follow the chunks
    assert main(["probe", "--data", "othello", "--n", "300", "--site", "resid_post.4", "--no-controls", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 296 and report["width"] == 96  # 37 games x 8 positions
    assert report["test_accuracy"] > report["majority_accuracy"] + 0.2
