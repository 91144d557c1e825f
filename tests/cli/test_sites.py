"""``mechscope sites``: aliases and module paths of built-in and Hugging Face-config models."""

import json
import subprocess
import sys

import pytest

from mechscope.cli import main

pytest.importorskip("transformers")

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 50, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 0}
LLAMA = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 24, "vocab_size": 30, "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture
def gpt2_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2))
    return str(path)


def test_hf_config_file_prints_aligned_tables(gpt2_config, capsys):
    assert main(["sites", "--hf-config", gpt2_config]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "GPT2LMHeadModel: 2 blocks at transformer.h, d_model 32, 4 heads x 8, d_mlp 128"
    header = next(i for i, line in enumerate(lines) if line.startswith("ALIAS"))
    rows = {line.split()[0]: line for line in lines[header + 1:] if line.strip() and not line.startswith("MODULE")}
    assert rows["resid_post.1"].split()[:4] == ["resid_post.1", "transformer.h.1", "output", "-"]
    assert rows["attn_out.0"].split()[:5] == ["attn_out.0", "transformer.h.0.attn", "output", "0", "32"]
    assert rows["head_out.0.<h>"].split()[:5] == ["head_out.0.<h>", "transformer.h.0.attn.c_proj", "input", "-", "8"]
    assert rows["mlp_hidden.1"].split()[4] == "128"
    column = lines[header].index("PATH")  # every alias row's path starts under the header
    assert all(rows[name][column:].startswith(rows[name].split()[1]) for name in ("embed", "resid_pre.0", "head_out.1.<h>"))
    assert "transformer.h.0.attn.c_attn" in out and "Conv1D" in out
    assert "tuple(Tensor[1, 2, 32], None)" in out


def test_hf_config_as_json_text_with_json_output(capsys):
    assert main(["sites", "--hf-config", json.dumps(LLAMA), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    s = data["structure"]
    assert data["model"] == "LlamaForCausalLM"
    assert (s["n_layers"], s["n_heads"], s["n_kv_heads"], s["head_dim"], s["d_mlp"]) == (1, 4, 2, 4, 24)
    assert s["blocks"][0]["attn_out_proj"] == "model.layers.0.self_attn.o_proj"
    sites = {r["name"]: r for r in data["sites"]}
    assert sites["resid_post.0"]["path"] == "model.layers.0" and sites["resid_post.0"]["element"] is None
    assert sites["attn_out.0"]["element"] == 0 and sites["unembed"]["width"] == 30
    assert sites["model.layers.0.mlp.down_proj"] == {
        "name": "model.layers.0.mlp.down_proj", "kind": "module", "path": "model.layers.0.mlp.down_proj",
        "io": "output", "element": None, "class": "Linear", "returns": "Tensor[1, 2, 16]", "width": None,
        "heads": None, "head_dim": None}


def test_builtin_model_and_no_modules(capsys):
    from mechscope import zoo

    assert "transformer" in zoo.names()
    assert main(["sites", "--model", "transformer", "--no-modules"]) == 0
    out = capsys.readouterr().out
    assert "resid_post.1" in out and "blocks.1.attn" in out and "MODULE" not in out


def test_builtin_model_without_blocks_lists_modules_only(capsys):
    assert main(["sites", "--model", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "no aliases apply" in out and "MODULE" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt7"], "unknown model 'gpt7'; valid: "),
    ([], "give exactly one of --model NAME or --hf-config"),
    (["--model", "mlp", "--hf-config", "{}"], "give exactly one of"),
    (["--hf-config", "/nonexistent/config.json"], "no Hugging Face config file"),
    (["--hf-config", "{not json"], "not valid JSON"),
    (["--hf-config", '{"n_layer": 2}'], "needs a string field 'model_type'"),
    (["--hf-config", '{"model_type": "no_such_family"}'], "does not know model_type 'no_such_family'"),
])
def test_usage_errors_exit_2_and_say_why(argv, message, capsys):
    assert main(["sites", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown model" in message:
        assert "transformer" in err and "mlp" in err


def test_missing_transformers_is_a_clear_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["sites", "--hf-config", json.dumps(GPT2)]) == 2
    assert "pip install 'mechscope[hf]'" in capsys.readouterr().err


def test_importing_the_command_does_not_import_torch():
    code = "import sys, mechscope.cli.sites; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
