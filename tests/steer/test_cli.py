"""``mechscope steer`` and ``mechscope reft`` on built-in models and random Hugging Face models."""

import json

import pytest
import torch

from mechscope.cli import main

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 40, "n_positions": 32,
        "bos_token_id": 0, "eos_token_id": 0}


def test_steer_add_on_the_steering_toy(capsys):
    assert main(["steer", "--n", "200", "--coeffs", "0,1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    zero, one = rep["results"]
    assert zero["kl"] == pytest.approx(0.0, abs=1e-6) and zero["p_target_after"] < 0.01
    assert one["p_target_after"] > 0.9  # adding the difference of means makes the toy say R


def test_steer_orthogonalize_saves_a_model_that_matches_hooks(tmp_path, capsys):
    out = tmp_path / "edited.safetensors"
    direction = tmp_path / "v.safetensors"
    assert main(["steer", "--n", "100", "--action", "orthogonalize", "--save-model", str(out),
                 "--save-direction", str(direction), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["max_abs_diff_vs_hooks"] < 1e-4 and out.exists() and direction.exists()
    from mechscope.core.checkpoint import load_tensors
    assert load_tensors(direction)[0]["direction"].shape == (64,)


def test_steer_on_a_hugging_face_model_from_jsonl(tmp_path, capsys):
    pytest.importorskip("transformers")
    rows = [{"tokens": [5, 6, 7 + i % 3, 1 if i % 2 else 2], "label": i % 2} for i in range(40)]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["steer", "--hf-config", json.dumps(GPT2), "--data", str(path), "--site", "resid_post.0",
                 "--action", "ablate", "--target-token", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"concept_inputs", "concept_free_inputs"} <= set(rep)


def test_steer_errors(tmp_path, capsys):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"tokens": [1, 2], "label": 1}) for _ in range(5)))
    assert main(["steer", "--data", str(path)]) == 2
    assert "label 0" in capsys.readouterr().err
    assert main(["steer", "--n", "50", "--coeffs", "1e39"]) == 2
    assert "overflows" in capsys.readouterr().err


def test_reft_trains_saves_and_reports(tmp_path, capsys):
    out = tmp_path / "reft.safetensors"
    assert main(["reft", "--steps", "30", "--n-train", "200", "--n-test", "50", "--layers", "0",
                 "--save", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    (row,) = rep["rows"]
    assert row["method"] == "loreft" and row["trainable_params"] == 2 * 4 * 64 + 4
    from mechscope.steer.reft import load_reft
    assert load_reft(out).sites[0].io == "input"


def test_reft_on_a_hugging_face_model_from_jsonl(tmp_path, capsys):
    pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(60):
        x = torch.randint(3, 30, (4,), generator=g).tolist()
        rows.append({"prompt": [1] + x + [2], "answer": [x[0]], "split": "test" if i < 10 else "train"})
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["reft", "--hf-config", json.dumps(GPT2), "--data", str(path), "--steps", "5", "--kind", "direft",
                 "--positions", "l1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["method"] == "direft" and row["trainable_params"] == 2 * (2 * 4 * 32 + 4)


def test_reft_usage_errors(capsys):
    assert main(["reft", "--positions", "x3", "--steps", "1", "--n-train", "10", "--n-test", "5"]) == 2
    assert "must look like" in capsys.readouterr().err
